"""`hiposeg predict`: label maps and colour overlays for any images, from any exported model.

    DIR/fine/{stem}.png            fine class ids (8-bit, 16-bit above 255 classes), the model's argmax
    DIR/coarse/{stem}.png          coarse class ids: pi(fine), the hierarchy's fine->coarse map
    DIR/overlay/{stem}.png         the fine palette blended over the image (--overlay fine|coarse|both|none;
    DIR/overlay-coarse/{stem}.png  the coarse one with coarse/both)

Nothing else is written, and never over data: --out must lie outside every prepared dataset (whose
label maps are ground truth), and neither it nor a folder in it (through links too) may contain an
input image; and it must be new or empty
unless `overwrite` (`--overwrite`) is given; each folder is checked writable before any inference.
Images are probed first (headers only), so a missing, empty or truncated file, or an image outside an
exported program's input limits, stops the command before any inference. They are then sorted by size and batched in groups of equal size (no padding, so a
batch's logits are exactly the single-image logits), decoded in loader workers, and predicted in
whole-image or sliding-window mode (`auto`: windows of the training crop when the image is larger).
"""

from __future__ import annotations

import glob
import os
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from hiposeg.compile import maybe_compiled
from hiposeg.data.codecs import IMAGE_EXTS, BadFile, encode_png, not_regular, probe_image
from hiposeg.data.layout import check_output_name
from hiposeg.errors import UserError
from hiposeg.export import InferenceModel
from hiposeg.inference import Mode, check_input_sizes, predict_logits
from hiposeg.palette import PALETTES, level_palette
from hiposeg.atomic import atomic_write_bytes, check_empty_folder, check_writable, name_too_long_fix, write_failure

IMAGE_SUFFIXES = (*IMAGE_EXTS, ".ppm", ".pgm")
OVERLAYS = ("fine", "coarse", "both", "none")
_GLOB_CHARS = set("*?[")


# ==========================================================================================
# Inputs
# ==========================================================================================


def collect_inputs(inputs: Sequence[str | Path]) -> list[Path]:
    """Files, folders (searched recursively for image files) and glob patterns -> sorted unique paths.

    An input that names nothing is an error, as is an empty result (two images with one stem:
    `check_stems`)."""
    found: list[Path] = []
    for item in inputs:
        text = str(item)
        if any(c in _GLOB_CHARS for c in text) and not Path(text).exists():
            matches = sorted(Path(m) for m in glob.glob(text, recursive=True))
            files = [m for m in matches if m.is_file() and m.suffix.lower() in IMAGE_SUFFIXES]
            if not files:
                raise UserError(f"the pattern {text!r} matches no image files",
                                hint=f"Image files end in {', '.join(IMAGE_SUFFIXES)}; quote the pattern so the "
                                     "shell passes it through, e.g. 'photos/*.jpg'.")
            found += files
        elif Path(text).is_dir():
            files = sorted(p for p in Path(text).rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
                           and not any(part.startswith(".") for part in p.relative_to(text).parts))
            if not files:
                raise UserError(f"folder {text} holds no image files ({', '.join(IMAGE_SUFFIXES)})")
            found += files
        elif Path(text).is_file():
            found.append(Path(text))
        elif Path(text).exists():  # a FIFO, socket or device: never opened (a FIFO would block)
            raise UserError(f"input {text} is {not_regular(os.stat(text).st_mode)}, not an image file",
                            hint="Give image files, folders or quoted glob patterns.")
        else:
            raise UserError(f"input {text} does not exist", hint="Give image files, folders or quoted glob patterns.")
    # abspath, not resolve(): a symlinked image (as in a prepared dataset) keeps its own stem
    unique = list(dict.fromkeys(Path(os.path.abspath(p)) for p in found))
    if not unique:
        raise UserError("no input images given", hint="Example: hiposeg predict model.pt photos/ --out preds")
    return unique


def check_stems(paths: Sequence[Path]) -> None:
    """Two images with one stem would write the same output files: an error naming both."""
    by_stem: dict[str, Path] = {}
    for p in paths:
        if p.stem in by_stem:
            raise UserError(f"two inputs share the name {p.stem!r}: {by_stem[p.stem]} and {p}; their outputs "
                            f"({p.stem}.png) would overwrite each other",
                            hint="Predict the two folders into different --out directories.")
        by_stem[p.stem] = p


def probe_sizes(paths: Sequence[Path]) -> list[tuple[int, int]]:
    """(H, W) of each image from its header (within the pixel limit, `codecs.max_pixels`), failing on
    the first unreadable file with its reason; a name too long for the output files is refused too."""
    sizes = []
    for p in paths:
        check_output_name(p.stem + ".png", p, "input image")
        try:
            sizes.append(probe_image(p))
        except BadFile as e:
            raise UserError(f"cannot read image {e.file}: {e.reason}",
                            hint="Remove it from the inputs, or replace it with a readable PNG/JPEG.") from None
    return sizes


def size_batches(sizes: Sequence[tuple[int, int]], batch_size: int) -> list[list[int]]:
    """Indices grouped by equal (H, W), in chunks of at most `batch_size`, largest groups first."""
    groups: dict[tuple[int, int], list[int]] = {}
    for i, hw in enumerate(sizes):
        groups.setdefault(tuple(hw), []).append(i)
    batches = []
    for members in sorted(groups.values(), key=len, reverse=True):
        batches += [members[k:k + batch_size] for k in range(0, len(members), batch_size)]
    return batches


def read_rgb(path: Path) -> np.ndarray:
    """(H, W, 3) uint8 RGB in stored pixel order (EXIF orientation is not applied, so predictions align
    with the file's pixels, as label maps do); greyscale, alpha and 16-bit images are converted."""
    img = cv2.imread(str(path), cv2.IMREAD_COLOR_RGB | cv2.IMREAD_IGNORE_ORIENTATION)
    if img is None:
        raise UserError(f"cannot read image {path}: OpenCV cannot decode it",
                        hint="Remove it from the inputs, or convert it to PNG/JPEG.")
    return img


class ImageFiles(Dataset):
    """Decodes and normalises one image per item (in loader workers); the batch sampler groups sizes."""

    def __init__(self, paths: Sequence[Path], sizes: Sequence[tuple[int, int]], mean: Sequence[float],
                 std: Sequence[float]) -> None:
        self.paths, self.sizes = list(paths), list(sizes)
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> dict[str, object]:
        rgb = read_rgb(self.paths[i])
        if rgb.shape[:2] != tuple(self.sizes[i]):
            raise UserError(f"image {self.paths[i]} decodes to {rgb.shape[1]}x{rgb.shape[0]}, but its header says "
                            f"{self.sizes[i][1]}x{self.sizes[i][0]}", hint="The file is damaged: replace it.")
        image = (torch.from_numpy(rgb).permute(2, 0, 1).float() / 255.0 - self.mean) / self.std
        return {"image": image, "rgb": torch.from_numpy(rgb), "index": i}


# ==========================================================================================
# Outputs
# ==========================================================================================


def output_dirs(out: Path, overlay: str) -> dict[str, Path]:
    """The folders predict writes for an --overlay choice, by level key."""
    dirs = {"fine": out / "fine", "coarse": out / "coarse"}
    if overlay in ("fine", "both"):
        dirs["overlay-fine"] = out / "overlay"
    if overlay in ("coarse", "both"):
        dirs["overlay-coarse"] = out / "overlay-coarse"
    return dirs


def check_output_folder(folder: Path, flag: str, *, overwrite: bool) -> None:
    """A folder of label maps to write (predict's --out, eval's --save-predictions): outside every
    prepared dataset, and new or empty unless --overwrite. Writes nothing."""
    from hiposeg.data.dataset import refuse_prepared_dataset

    refuse_prepared_dataset(folder, flag)
    check_empty_folder(folder, flag, overwrite=overwrite)


def check_outputs(out: Path, inputs: Sequence[Path], dirs: dict[str, Path], *, overwrite: bool) -> None:
    """The rule of the module docstring, before anything is written."""
    from hiposeg.data.dataset import refuse_prepared_dataset

    check_output_folder(out, "--out", overwrite=overwrite)
    for d in dirs.values():  # e.g. OUT/fine as a link into a dataset
        refuse_prepared_dataset(d, "--out")
    refuse_outputs_over_inputs([out, *dirs.values()], inputs, "--out")


def refuse_outputs_over_inputs(folders: Sequence[Path], inputs: Sequence[Path], flag: str) -> None:
    """No folder written may hold an input image, even with --overwrite, after resolving links on both
    sides: each folder as given and where it leads (OUT/fine as a link to the input folder), each
    image as given and its real file (a prepared dataset's image links lead to the raw release)."""
    places = [(p, os.path.abspath(p), os.path.realpath(p)) for p in inputs]
    for d in folders:
        roots = (os.path.abspath(d), os.path.realpath(d))
        for p, given, real in places:
            if any(w.startswith(r + os.sep) for w in (given, real) for r in roots):
                raise UserError(f"{flag} {d}{_link_note(*roots)} contains the input image {p}"
                                f"{_link_note(given, real)}: predictions written there could overwrite inputs (or be "
                                "read as inputs next time)",
                                hint="Write the predictions to a folder outside the input folders.")


def _link_note(given: str, real: str) -> str:
    return f" (a link to {real})" if real != given else ""


def blend(rgb: np.ndarray, labels: np.ndarray, palette: np.ndarray, alpha: float) -> np.ndarray:
    """(1 - alpha) * image + alpha * palette[label], uint8 RGB; out-of-palette ids keep the image."""
    known = labels < len(palette)
    colours = palette[np.where(known, labels, 0)].astype(np.float32)
    mixed = (1.0 - alpha) * rgb.astype(np.float32) + alpha * colours
    return np.where(known[..., None], np.rint(mixed), rgb).astype(np.uint8)


def write_png(path: Path, array: np.ndarray) -> None:
    """Atomic PNG write; `array` is a 2-D label map or (H, W, 3) RGB. A failed write is one clear error."""
    try:
        atomic_write_bytes(path, encode_png(cv2.cvtColor(array, cv2.COLOR_RGB2BGR) if array.ndim == 3 else array))
    except OSError as e:
        raise UserError(f"could not write {write_failure(e, path)}",
                        hint=name_too_long_fix(e) or "Free disk space or choose another --out; rerun with --overwrite "
                                                     "to redo the images.") from None


@dataclass
class PredictSummary:
    out: Path
    images: int
    batches: int
    seconds: float


def predict(model: InferenceModel, inputs: Sequence[str | Path], out: Path, *, mode: Mode = "auto",
            batch_size: int = 4, overlay: str = "fine", alpha: float = 0.5, workers: int = 2,
            device: torch.device | None = None, progress: bool = True, overwrite: bool = False,
            compile_model: bool = False, palette: str = "hierarchy") -> PredictSummary:
    """Predict every input image and write its fine, coarse and overlay PNGs under `out` (`compile_model`:
    through torch.compile, `hiposeg.compile`); overlays use the hierarchy file's colours or hue families
    (`palette`, see `hiposeg.palette`)."""
    if mode not in ("auto", "whole", "slide"):
        raise UserError(f"--mode {mode!r} is not one of auto, whole, slide")
    if overlay not in OVERLAYS:
        raise UserError(f"--overlay {overlay!r} is not one of {', '.join(OVERLAYS)}")
    if palette not in PALETTES:
        raise UserError(f"--palette {palette!r} is not one of {', '.join(PALETTES)}")
    if batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {batch_size}")
    if not 0.0 <= alpha <= 1.0:
        raise UserError(f"--alpha must be in [0, 1], got {alpha}")
    if compile_model and model.source == "onnx":
        raise UserError("--compile compiles a PyTorch model, but this is an ONNX model (it runs in onnxruntime)",
                        hint="Drop --compile, or predict from the hiposeg .pt or torch-export .pt2 model.")
    out = Path(out)
    paths = collect_inputs(inputs)
    dirs = output_dirs(out, overlay)
    check_outputs(out, paths, dirs, overwrite=overwrite)  # first: outputs read back as inputs share stems
    check_stems(paths)
    sizes = probe_sizes(paths)
    batches = size_batches(sizes, batch_size)
    check_input_sizes(model.module, list(zip(paths, sizes)), mode, model.crop, max(map(len, batches)))
    for d in dirs.values():
        check_writable(d, "--out folder")
    device = device or torch.device("cpu")
    h = model.hierarchy
    pi = np.asarray(h.fine_to_coarse).astype(h.label_dtype)
    palettes = {"fine": level_palette(h, h.fine_level, palette), "coarse": level_palette(h, h.coarse_level, palette)}
    overlays = {"fine": ["fine"], "coarse": ["coarse"], "both": ["fine", "coarse"], "none": []}[overlay]
    loader = DataLoader(ImageFiles(paths, sizes, model.mean, model.std), batch_sampler=batches,
                        num_workers=min(workers, len(batches)), collate_fn=_collate)
    module = maybe_compiled(model.module.eval(), compile_model, "inference model")
    t0 = time.perf_counter()
    with _progress(progress, len(paths)) as advance, torch.no_grad():
        for batch in loader:
            images = batch["image"].to(device)
            logits = predict_logits(module, images, h.num_fine, mode=mode, crop=model.crop)
            fine = logits.argmax(1).cpu().numpy().astype(h.label_dtype)  # one device->host copy per batch
            levels = {"fine": fine, "coarse": pi[fine]}
            for j, i in enumerate(batch["index"]):
                stem = paths[i].stem
                maps = {k: v[j] for k, v in levels.items()}
                write_png(dirs["fine"] / f"{stem}.png", maps["fine"])
                write_png(dirs["coarse"] / f"{stem}.png", maps["coarse"])
                for level in overlays:
                    write_png(dirs[f"overlay-{level}"] / f"{stem}.png",
                              blend(batch["rgb"][j].numpy(), maps[level], palettes[level], alpha))
            advance(len(batch["index"]))
    return PredictSummary(out, len(paths), len(batches), time.perf_counter() - t0)


def _collate(items: list[dict[str, object]]) -> dict[str, object]:
    return {"image": torch.stack([it["image"] for it in items]), "rgb": [it["rgb"] for it in items],
            "index": [it["index"] for it in items]}


@contextmanager
def _progress(enabled: bool, total: int) -> Iterator[Callable[[int], None]]:
    """A Rich progress bar over images on stderr (or nothing); yields `advance(n)`."""
    if not enabled:
        yield lambda n: None
        return
    from hiposeg.progress import work_progress

    with work_progress(unit="img", transient=True) as bar:
        task = bar.add_task("predict", total=total)
        yield lambda n: bar.advance(task, n)
