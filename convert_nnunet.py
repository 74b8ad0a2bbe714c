"""Convert an nnU-Net v2 raw dataset (DatasetXXX_Name) into this project's dataset layout.

    python convert_nnunet.py --nnunet-dir nnUNet_raw/Dataset501_BUSI --out-dir inputs/BUSI_nnunet
    python split.py --data-dir inputs/BUSI_nnunet

Reads dataset.json (one channel, a 2-D file_ending such as .png, labels with background 0),
imagesTr/<case>_0000<ext> and labelsTr/<case><ext>. Writes <out>/images/<case><ext> (relative links
to the nnU-Net images; --copy copies them), <out>/masks/0/<case>.png (255 where the label map equals
--foreground-label, else 0) and, with an imagesTs folder, <out>/test/images/<case><ext> (for
predict.py --input-dir <out>/test). Every file is checked first; any problem (a case without a label,
a label of another size, undeclared label values...) is one error and nothing is written. The output
folder appears only once complete and is never written over.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from dataloaders.nnunet import convert
from utils.cli import run_cli


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    parser.add_argument("--nnunet-dir", type=Path, required=True,
                        help="the nnU-Net v2 raw dataset folder (DatasetXXX_Name, with dataset.json) (required)")
    parser.add_argument("--out-dir", type=Path, required=True,
                        help="the dataset folder to write (images/, masks/0/); must not exist (required)")
    parser.add_argument("--foreground-label", default="1", metavar="LABEL",
                        help="the label value (or name in dataset.json's labels) that is foreground; every other "
                             "value is background (default: 1)")
    parser.add_argument("--copy", action="store_true",
                        help="copy the images instead of linking to them (default: relative symbolic links)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    summary = convert(args.nnunet_dir, args.out_dir, args.foreground_label, args.copy)
    print(f"{args.nnunet_dir} -> {args.out_dir}: {summary['cases']} cases (images {summary['images']}), masks 255 where "
          f"the label is {summary['foreground']}" + (f", {summary['test_cases']} test images in "
                                                     f"{args.out_dir / 'test' / 'images'}" if summary["test_cases"] else ""))
    if summary["empty_masks"]:
        print(f"  {len(summary['empty_masks'])} case(s) without foreground (empty masks), e.g. {summary['empty_masks'][0]}")
    print(f"next: python split.py --data-dir {args.out_dir}")
    return 0


if __name__ == "__main__":
    run_cli(main)
