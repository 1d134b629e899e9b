"""ADE20K SceneParsing (ADEChallengeData2016) -> prepared dataset.

Layout of `ADEChallengeData2016.zip` (CSAILVision/sceneparsing README); RAW is that folder:

    RAW/images/{training,validation}/ADE_{train,val}_NNNNNNNN.jpg
    RAW/annotations/{training,validation}/ADE_{train,val}_NNNNNNNN.png

Annotations are 8-bit grayscale: 0 = "other objects" (not evaluated -> ignore), 1..150 = the
objectInfo150 classes. The hierarchy's raw mapping turns value v into leaf id v-1 (the usual
`reduce_zero_label`). Output splits are `train` and `val`; stems are the file stems.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

from hiposeg.data.sources import (Discovery, Source, check_dir, describe_dir, list_files, partner_in,
                                  split_folders)
from hiposeg.errors import UserError

RELEASE_SPLITS = {"train": "training", "val": "validation"}
EXPECTED = ("RAW/images/{training,validation}/*.jpg and RAW/annotations/{training,validation}/*.png "
            "(RAW = the ADEChallengeData2016 folder)")


class ADE20K(Source):
    """ADE20K SceneParsing (150 classes).

    Expected layout (RAW = the ADEChallengeData2016 folder):

      RAW/images/{training,validation}/ADE_*.jpg
      RAW/annotations/{training,validation}/ADE_*.png

    Annotation value 0 (other) -> 255 (ignore), 1..150 -> classes 0..149.
    Output splits: train, val.
    """

    name: ClassVar[str] = "ade20k"
    default_hierarchy: ClassVar[str] = "ade20k"
    label_expected: ClassVar[str] = "ADE20K annotations: 8-bit grayscale, 0 = other, 1..150 = classes"

    def discover(self, raw: Path) -> Discovery:
        img_root, ann_root = raw / "images", raw / "annotations"
        if not check_dir(img_root, "images") or not check_dir(ann_root, "annotations"):
            nested = raw / "ADEChallengeData2016"
            hint = (f"Give the inner folder: `hiposeg prepare ade20k {nested}`." if nested.is_dir()
                    else "RAW is the ADEChallengeData2016 folder unpacked from ADEChallengeData2016.zip.")
            raise UserError(f"no ADE20K SceneParsing release in {raw}: expected {EXPECTED}; found: {describe_dir(raw)}",
                            hint=hint)
        found = Discovery(items={})
        for split, release in RELEASE_SPLITS.items():
            img_dir, ann_dir = img_root / release, ann_root / release
            if not split_folders(found, split, img_dir, ann_dir, raw, EXPECTED):
                continue
            images = list_files(img_dir, [".jpg", ".jpeg", ".png"])
            labels = list_files(ann_dir, [".png"])
            if not images and not labels:
                raise UserError(f"{img_dir} and {ann_dir} hold no images/annotations", hint=f"Expected {EXPECTED}.")
            found.add_split(split, images, labels, partner_in(ann_dir, ".png"), partner_in(img_dir, ".jpg"))
        if not found.items:
            raise UserError(f"{img_root} has neither training/ nor validation/: expected {EXPECTED}",
                            hint=f"Found in {img_root}: {describe_dir(img_root)}.")
        return found
