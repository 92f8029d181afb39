"""awm-fast: Advantage Weighted Matching for flow-matching diffusion transformers."""
import sys
from importlib.machinery import ModuleSpec
from pathlib import Path

from awm_fast.logs import install_default_handler

install_default_handler()  # messages print on stdout like before; see awm_fast/logs.py to silence or redirect them

_CHECKOUT = Path(__file__).resolve().parent.parent


class _CheckoutKernels:
    """The Triton kernels live at the repository root (kernels/) and install as awm_fast.kernels (pyproject.toml's
    package-dir), a package without an __init__.py: a regular package named `kernels` at the root would shadow
    the `kernels` distribution (Hugging Face hub kernels, which transformers imports when installed) for every
    process with the checkout on sys.path (pytest, `python -m` from the root). A source checkout imported without
    an install of its own (PYTHONPATH=the checkout, a git worktree) finds its own kernels/ here; installs (wheel,
    editable) find them without this."""

    @staticmethod
    def find_spec(name, path=None, target=None):
        if name != f"{__name__}.kernels":
            return None
        spec = ModuleSpec(name, None, is_package=True)
        spec.submodule_search_locations = [str(_CHECKOUT / "kernels")]
        return spec


if not (Path(__file__).parent / "kernels").exists() and (_CHECKOUT / "pyproject.toml").is_file() and (
        _CHECKOUT / "kernels" / "awm_loss.py").is_file():
    sys.meta_path.insert(0, _CheckoutKernels())
