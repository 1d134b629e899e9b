"""Cityscapes (gtFine) -> prepared dataset.

Layout of the official release (`leftImg8bit_trainvaltest.zip` + `gtFine_trainvaltest.zip`,
cityscapesScripts README):

    RAW/leftImg8bit/{train,val}/{city}/{city}_{seq}_{frame}_leftImg8bit.png
    RAW/gtFine/{train,val}/{city}/{city}_{seq}_{frame}_gtFine_labelIds.png

Labels are the 8-bit `labelIds` (0..33) that ship with the release; the hierarchy maps them to
the 19 trainIds and 7 categories (ids with trainId 255 -> ignore). The generated
`*_labelTrainIds.png` are not read: they are not in the download and depend on the script run.
The test split is not prepared (its annotations are not public). Stems: `{city}_{seq}_{frame}`.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

from hiposeg.data.sources import (Discovery, Source, add_unique, check_dir, describe_dir, list_files, list_subdirs,
                                  split_folders)
from hiposeg.errors import UserError

IMAGE_SUFFIX = "_leftImg8bit.png"
LABEL_SUFFIX = "_gtFine_labelIds.png"
EXPECTED = (f"RAW/leftImg8bit/{{train,val}}/CITY/*{IMAGE_SUFFIX} and RAW/gtFine/{{train,val}}/CITY/*{LABEL_SUFFIX} "
            "(leftImg8bit_trainvaltest.zip and gtFine_trainvaltest.zip unpacked into RAW)")


class Cityscapes(Source):
    """Cityscapes gtFine: 19 classes (trainIds) in 7 categories.

    Expected layout (leftImg8bit_trainvaltest.zip + gtFine_trainvaltest.zip unpacked into RAW):

      RAW/leftImg8bit/{train,val}/CITY/*_leftImg8bit.png
      RAW/gtFine/{train,val}/CITY/*_gtFine_labelIds.png

    The 8-bit labelIds are mapped to trainIds (fine) and categories (coarse);
    ids without a trainId become 255 (ignore).
    """

    name: ClassVar[str] = "cityscapes"
    default_hierarchy: ClassVar[str] = "cityscapes"
    label_expected: ClassVar[str] = f"Cityscapes *{LABEL_SUFFIX}: 8-bit label ids 0..33, not the *_gtFine_color.png"

    def discover(self, raw: Path) -> Discovery:
        img_root, gt_root = raw / "leftImg8bit", raw / "gtFine"
        has_img, has_gt = check_dir(img_root, "leftImg8bit"), check_dir(gt_root, "gtFine")
        if not has_img and not has_gt:
            hint = ""
            if (raw / "train").is_dir() or (raw / "val").is_dir():
                hint = f" {raw} looks like leftImg8bit/ or gtFine/ itself: give their parent folder as RAW."
            raise UserError(f"no Cityscapes release in {raw}: expected {EXPECTED}; found: {describe_dir(raw)}",
                            hint="RAW is the folder that contains leftImg8bit/ and gtFine/." + hint)
        if not has_gt or not has_img:
            missing = "gtFine" if not has_gt else "leftImg8bit"
            zipname = "gtFine_trainvaltest.zip" if not has_gt else "leftImg8bit_trainvaltest.zip"
            raise UserError(f"{raw / missing} is missing: expected {EXPECTED}",
                            hint=f"Unpack {zipname} into {raw}.")
        found = Discovery(items={})
        for split in self.splits:
            img_dir, gt_dir = img_root / split, gt_root / split
            if not split_folders(found, split, img_dir, gt_dir, raw, EXPECTED):
                continue
            images, labels = self._split_files(img_dir, gt_dir)
            found.add_split(
                split, images, labels,
                label_for=lambda p: gt_dir / p.parent.name / p.name.replace(IMAGE_SUFFIX, LABEL_SUFFIX),
                image_for=lambda p: img_dir / p.parent.name / p.name.replace(LABEL_SUFFIX, IMAGE_SUFFIX))
        if not found.items:
            raise UserError(f"neither {img_root}/train nor {img_root}/val exists: expected {EXPECTED}",
                            hint=f"Found in {img_root}: {describe_dir(img_root)}.")
        return found

    def _split_files(self, img_dir: Path, gt_dir: Path) -> tuple[dict[str, Path], dict[str, Path]]:
        images: dict[str, Path] = {}
        labels: dict[str, Path] = {}
        other_labels: list[str] = []
        for city in list_subdirs(img_dir):
            for stem, path in list_files(city, [IMAGE_SUFFIX], strip=IMAGE_SUFFIX).items():
                add_unique(images, stem, path)  # the same frame in two city folders
        for city in list_subdirs(gt_dir):
            for stem, path in list_files(city, [LABEL_SUFFIX], strip=LABEL_SUFFIX).items():
                add_unique(labels, stem, path)
            if not labels:
                other_labels += [p.name for p in list_files(city, ["_labelTrainIds.png", "_color.png"]).values()][:3]
        if images and not labels:
            extra = f" (found {', '.join(other_labels)}: hiposeg reads the labelIds files)" if other_labels else ""
            raise UserError(f"no *{LABEL_SUFFIX} files under {gt_dir}/CITY/{extra}",
                            hint="Unpack gtFine_trainvaltest.zip: it ships *_gtFine_labelIds.png for every image.")
        if not images:
            raise UserError(f"no *{IMAGE_SUFFIX} files under {img_dir}/CITY/",
                            hint=f"Expected {EXPECTED}; found in {img_dir}: {describe_dir(img_dir)}.")
        return images, labels
