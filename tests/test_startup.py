"""First contact is quick: `awm-fast --help`, each command's --help and `presets` import none of the heavy
model libraries (diffusers, peft, transformers) nor matplotlib; they load when a command does real work."""
import subprocess
import sys

import pytest

HEAVY = ("diffusers", "peft", "transformers", "matplotlib")
PROBE = """
import sys
from awm_fast.cli import main
try:
    main({argv!r})
except SystemExit:
    pass
print("LOADED", sorted(m for m in {heavy!r} if m in sys.modules))
"""


@pytest.mark.parametrize("argv", [["--help"], ["presets"], ["train", "--help"], ["eval", "--help"],
                                  ["sample", "--help"], ["export", "--help"], ["serve-reward", "--help"]])
def test_help_and_presets_import_no_model_library(argv):
    out = subprocess.run([sys.executable, "-c", PROBE.format(argv=argv, heavy=HEAVY)], capture_output=True,
                         text=True, timeout=120).stdout
    assert "LOADED []" in out, out[-500:]


def test_sample_help_names_every_sampler(capsys):
    from awm_fast.cli import main
    from awm_fast.sampling.rollout import SAMPLERS

    with pytest.raises(SystemExit):
        main(["sample", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert all(name in text for name in SAMPLERS), (SAMPLERS, text)
