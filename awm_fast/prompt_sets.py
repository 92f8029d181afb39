"""The official prompt sets: which file of which official repository at which commit, fetched once into the cache.

    awm-fast prompts fetch NAME [NAME ...] | all     download, verify, cache; prints where each file is
    sample.prompt_file: official:geneval_train        how a config names one (resolve_prompt_file)

Each set is one file of an official repository at a pinned commit, downloaded from
    {base_url}/{repo}/{commit}/{path}      base_url = $AWM_FAST_PROMPTS_URL or https://raw.githubusercontent.com
and checked before it is kept: its git blob id sha1("blob <size>\\0" + bytes) must equal the id in the pinned
commit's tree, and its sha256 the recorded one (known for the files whose bytes we could hash; the two large
training files carry the git blob id alone). The bytes go to a temporary file beside the target that replaces
the target only once verified, so an interrupted or refused download leaves nothing under the cache folder
(awm_fast.config.cache_root() / "prompts"). Transient failures (connection errors, timeouts, HTTP 5xx / 429, a
body shorter than its Content-Length) are retried `retries` times with a doubling wait; the last one is reported
as one line.

The sets (all from scxue/advantage_weighted_matching, the files its dgx_awm.py presets train and evaluate on,
byte-identical to yifan123/flow_grpo's dataset/ files; DrawBench from NVlabs/DiffusionNFT, which the AWM
repository does not ship):
    geneval_train / geneval_test      dataset/geneval/{train,test}_metadata.jsonl (GenEval tags, include/exclude)
    ocr_train / ocr_test              dataset/ocr/{train,test}.txt
    pickscore_train / pickscore_test  dataset/pickscore/{train,test}.txt
    drawbench_test                    dataset/drawbench/test.txt
"""
from __future__ import annotations

import hashlib
import http.client
import os
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from awm_fast.config import cache_root

OFFICIAL = "official:"  # the prefix of a prompt file value that names an official set
BASE_URL_ENV = "AWM_FAST_PROMPTS_URL"
DEFAULT_BASE_URL = "https://raw.githubusercontent.com"
AWM_REPO, AWM_COMMIT = "scxue/advantage_weighted_matching", "be5137232e33a21b449ed65a533211d0deb97ed8"
NFT_REPO, NFT_COMMIT = "NVlabs/DiffusionNFT", "24af5554898d85e93efa492f42b5e9cdf4156e9b"
CHUNK = 1 << 16


@dataclass(frozen=True)
class OfficialFile:
    """One official file: `path` in `repo` at `commit`, its git blob id there and (when known) its sha256."""

    name: str
    repo: str
    commit: str
    path: str
    git_blob: str
    sha256: str | None = None
    about: str = ""

    @property
    def filename(self) -> str:
        """The cached file's name: the set's name, the commit it is pinned to, the official suffix."""
        return f"{self.name}@{self.commit[:10]}{Path(self.path).suffix}"

    def url(self, base_url: str) -> str:
        return f"{base_url.rstrip('/')}/{self.repo}/{self.commit}/{self.path}"


def _awm(name: str, path: str, git_blob: str, sha256: str | None, about: str) -> OfficialFile:
    return OfficialFile(name, AWM_REPO, AWM_COMMIT, f"advantage_weighted_matching/dataset/{path}", git_blob, sha256,
                        about)


PROMPT_SETS: dict[str, OfficialFile] = {f.name: f for f in (
    _awm("geneval_train", "geneval/train_metadata.jsonl", "0b97e8a6802c08fc7537cd00c76ae79c851bddcb", None,
         "GenEval training metadata (one JSON object per prompt)"),
    _awm("geneval_test", "geneval/test_metadata.jsonl", "27cdaf5cc1356fe15aeadbb8df55682ca74228f0",
         "cec4b24b9fee7bac21c8f787054ecc8dc9ff831674037713a4cd35e0f0a74a28", "GenEval test metadata, 2212 prompts"),
    _awm("ocr_train", "ocr/train.txt", "3ce0521b77b0a9031191d66ecc36ebaaf27a3922", None, "OCR training prompts"),
    _awm("ocr_test", "ocr/test.txt", "8deb4f8d8f2e863f45353354243669b3c991a6a2",
         "4dd8caf3ab6ade73bd376c7d14c6ca49b6eacfb1bd321e22c40714ae4a98d4dc", "OCR test prompts, 1018"),
    _awm("pickscore_train", "pickscore/train.txt", "a437bd921c03fbc00c4e7ce148ae2d28fcd6e49b",
         "2f425adcbb9a6d0feee7c6c448e1cb83a1f71deca9434b803907e2578eca837f", "PickScore training prompts, 25432"),
    _awm("pickscore_test", "pickscore/test.txt", "45f05231b969fb5f74c8debd606b22cd3be27f8e",
         "d75c025fa451866e70f7e36243f7cdd93095523cb51f5f9651f2ce3236d20262", "PickScore test prompts, 2048"),
    OfficialFile("drawbench_test", NFT_REPO, NFT_COMMIT, "dataset/drawbench/test.txt",
                 "8d96e7cf7017ce6ce299a6eec96e21467a2ac7aa",
                 "9006b98feabb94b28a2bc0c88de42fd4f31a9ec3c2a19e308a02c5385b7172f0", "DrawBench prompts as DiffusionNFT ships them, 1000"),
)}


class PromptSetMissing(FileNotFoundError):
    """An official set a config names is not in the cache yet: one line naming the command that fetches it."""


class DownloadError(OSError):
    """A download that failed after its retries, or whose bytes did not verify (nothing was cached)."""


def prompts_dir() -> Path:
    return cache_root() / "prompts"


def lookup(name: str) -> OfficialFile:
    if name not in PROMPT_SETS:
        raise ValueError(f"no official prompt set {name!r}: one of {', '.join(PROMPT_SETS)}")
    return PROMPT_SETS[name]


def cached_path(name: str) -> Path:
    return prompts_dir() / lookup(name).filename


def fetch_command(names: list[str]) -> str:
    return "awm-fast prompts fetch " + " ".join(names)


def resolve_prompt_files(*values: str) -> list[str]:
    """Config prompt file values as paths: `official:NAME` -> the cached file, anything else unchanged.
    PromptSetMissing (one line naming the fetch command for all of them) when a named set is not cached."""
    names = [v.removeprefix(OFFICIAL) for v in values if v.startswith(OFFICIAL)]
    paths = {name: cached_path(name) for name in names}
    missing = list(dict.fromkeys(n for n in names if not paths[n].is_file()))
    if missing:
        raise PromptSetMissing(f"the official prompt set{'s' * (len(missing) > 1)} {', '.join(missing)} "
                               f"{'are' if len(missing) > 1 else 'is'} not downloaded: run `{fetch_command(missing)}` "
                               f"(into {prompts_dir()})")
    return [str(paths[v.removeprefix(OFFICIAL)]) if v.startswith(OFFICIAL) else v for v in values]


def git_blob_id(data: bytes) -> str:
    """git's object id of a file's bytes: sha1(b"blob <size>\\0" + data)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def verify(entry: OfficialFile, data: bytes) -> None:
    """ValueError (one line) unless `data` has the entry's git blob id and, when recorded, its sha256."""
    blob = git_blob_id(data)
    if blob != entry.git_blob:
        raise ValueError(f"{entry.name}: the downloaded {len(data)} bytes have git blob id {blob}, expected "
                         f"{entry.git_blob} ({entry.repo}@{entry.commit[:10]}:{entry.path}); nothing was cached")
    digest = hashlib.sha256(data).hexdigest()
    if entry.sha256 is not None and digest != entry.sha256:
        raise ValueError(f"{entry.name}: sha256 {digest} of the download, expected {entry.sha256}; nothing was cached")


def _transient(exc: BaseException) -> bool:
    if isinstance(exc, urllib.error.HTTPError):
        return exc.code >= 500 or exc.code == 429
    return isinstance(exc, (urllib.error.URLError, TimeoutError, ConnectionError, http.client.HTTPException,
                            _ShortBody))


class _ShortBody(OSError):
    pass


def _download(url: str, timeout_s: float) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout_s) as response:
        expected = response.headers.get("Content-Length")
        chunks = []
        while chunk := response.read(CHUNK):
            chunks.append(chunk)
    data = b"".join(chunks)
    if expected is not None and len(data) != int(expected):
        raise _ShortBody(f"{len(data)} of {expected} bytes")
    return data


def fetch(name: str, *, base_url: str | None = None, retries: int = 3, wait_s: float = 1.0,
          timeout_s: float = 60.0, force: bool = False) -> Path:
    """Download the official set `name` (module docstring) unless it is already cached and verifies; returns its
    path. DownloadError (one line) after `retries` retries of transient failures, on another HTTP error, or when
    the bytes do not verify; no file is left behind in any of these cases, nor on an interrupt."""
    entry = lookup(name)
    target = prompts_dir() / entry.filename
    if target.is_file() and not force:
        try:
            verify(entry, target.read_bytes())
            return target
        except ValueError:
            pass  # a damaged copy: fetched again below
    url = entry.url(base_url or os.environ.get(BASE_URL_ENV) or DEFAULT_BASE_URL)
    for attempt in range(retries + 1):
        try:
            data = _download(url, timeout_s)
            break
        except (OSError, http.client.HTTPException) as exc:  # URLError / HTTPError are OSErrors
            reason = exc.reason if type(exc) is urllib.error.URLError else exc
            if not _transient(exc) or attempt == retries:
                tries = f" after {attempt + 1} tries" if attempt else ""
                raise DownloadError(f"{name}: could not download {url}{tries}: {reason}") from None
            time.sleep(wait_s * 2**attempt)
    try:
        verify(entry, data)
    except ValueError as exc:
        raise DownloadError(str(exc)) from None
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{entry.filename}.", suffix=".part", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target
