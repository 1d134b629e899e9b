"""ImageNet weights the way users get them: through the library that owns them, into its cache.

    TorchHubFile   torchvision's weights (a URL): torch.hub's cache, $TORCH_HOME/hub/checkpoints/<file>,
                   downloaded by `torch.hub.download_url_to_file`, which checks the hash in the file name
    HubFile        timm's and segmentation_models_pytorch's weights (a Hugging Face repository, smp's at
                   pinned revisions): the hub client's cache ($HF_HUB_CACHE, by default
                   ~/.cache/huggingface/hub), downloaded by `huggingface_hub.hf_hub_download`

`fetch()` returns the local file, downloading it once. Offline (`HIPOSEG_OFFLINE=1` for every
source; `HF_HUB_OFFLINE=1` for the hub's), or when the download fails, it raises a UserError that
names the missing file, where the cache expects it, and the two ways out: run once on a machine
with network (the cache is then filled), or pass the file itself with `--pretrained PATH`. Both
downloaders write to a temporary file and rename it when complete, so an interrupted download never
leaves a partial file under the final name; a damaged file put there by hand is refused when read
(`pretrained.read_state_dict`).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from hiposeg.errors import UserError

OFFLINE_ENV = "HIPOSEG_OFFLINE"
# torchvision names its files <name>-<first hex digits of the sha256>.pth; torch.hub checks them.
_HASH_IN_NAME = re.compile(r"-([a-f0-9]+)\.")


def offline() -> bool:
    """Whether downloads are off for every source (the hub's own HF_HUB_OFFLINE is read by the hub)."""
    return os.environ.get(OFFLINE_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def missing_weights(what: str, file: str, where: str, cause: str) -> UserError:
    """The error for weights that are neither in the cache nor downloadable: the file, the place, the fixes."""
    return UserError(f"the ImageNet weights of {what} are not on this machine: {file} is missing ({cause}); "
                     f"the cache expects it at {where}",
                     hint="Either run this command once on a machine with network access (the file is then cached "
                          "there; copy the cache folder here), or download the file yourself and pass it with "
                          "--pretrained PATH.")


@dataclass(frozen=True)
class TorchHubFile:
    """A file torch.hub downloads from `url` into $TORCH_HOME/hub/checkpoints (torchvision's weights)."""

    what: str  # e.g. "torchvision ResNet101_Weights.IMAGENET1K_V1"
    url: str

    @property
    def name(self) -> str:
        return Path(urlparse(self.url).path).name

    def cache_path(self) -> Path:
        import torch.hub

        return Path(torch.hub.get_dir()) / "checkpoints" / self.name

    def fetch(self) -> Path:
        import torch.hub

        path = self.cache_path()
        if path.is_file():
            return path
        if offline():
            raise missing_weights(self.what, self.name, path, f"{OFFLINE_ENV} is set: nothing is downloaded")
        match = _HASH_IN_NAME.search(self.name)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.hub.download_url_to_file(self.url, str(path), match.group(1) if match else None, progress=True)
        except (OSError, RuntimeError, ValueError) as e:  # URLError is an OSError; a hash mismatch a RuntimeError
            raise missing_weights(self.what, self.name, path, f"downloading {self.url} failed: "
                                  f"{str(e).splitlines()[0][:200]}") from None
        return path

    def describe(self) -> str:
        return f"{self.what} ({self.url})"


@dataclass(frozen=True)
class HubFile:
    """A file of a Hugging Face model repository, fetched by the hub client into its cache."""

    what: str  # e.g. "timm hrnet_w48.ms_in1k"
    repo_id: str
    filename: str = "model.safetensors"
    revision: str | None = None  # None: the repository's main branch

    def cache_path(self) -> str:
        """Where the hub's cache keeps the file (the snapshot folder is named by the commit)."""
        from huggingface_hub import constants
        from huggingface_hub.file_download import repo_folder_name

        folder = Path(constants.HF_HUB_CACHE) / repo_folder_name(repo_id=self.repo_id, repo_type="model")
        commit = self.revision or "<the commit named in refs/main>"
        return f"{folder / 'snapshots' / commit / self.filename}"

    def fetch(self) -> Path:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

        try:
            return Path(hf_hub_download(self.repo_id, self.filename, revision=self.revision,
                                        local_files_only=offline()))
        except LocalEntryNotFoundError as e:  # offline, or no network: not in the cache
            raise missing_weights(self.what, self.filename, self.cache_path(),
                                  self._offline_cause(e)) from None
        except (HfHubHTTPError, OSError, ValueError) as e:
            raise missing_weights(self.what, self.filename, self.cache_path(), f"downloading it from the Hugging "
                                  f"Face repository {self.repo_id} failed: {str(e).splitlines()[0][:200]}") from None

    def _offline_cause(self, e: Exception) -> str:
        if offline():
            return f"{OFFLINE_ENV} is set: nothing is downloaded"
        from huggingface_hub import constants

        if constants.HF_HUB_OFFLINE:
            return "HF_HUB_OFFLINE is set: the hub client downloads nothing"
        return f"the Hugging Face hub could not be reached: {str(e).splitlines()[0][:160]}"

    def describe(self) -> str:
        at = f"@{self.revision[:12]}" if self.revision else ""
        return f"{self.what} (huggingface.co/{self.repo_id}{at})"


WeightsSource = TorchHubFile | HubFile
