"""What `tools/make_labels.py` does: an image folder with captions (a same-named .txt / .caption file beside each
image, or a CSV of file names and captions) -> the label JSON train.py and tools/extract_features.py read, with each
image's size read from its header."""
from __future__ import annotations

import json
import os
from pathlib import Path

from pixart.cli.options import ArgumentParser
from pixart.data.sources import CaptionFolderSource, CSVSource, DataError, label_items


def build_parser(description: str | None = None) -> ArgumentParser:
    p = ArgumentParser(description=description)
    p.add_argument("--image_dir", required=True, help="the image folder (searched recursively)")
    p.add_argument("--captions_csv", default=None, help="a CSV of file_name/path/image and text/caption/prompt "
                   "columns (default: a .txt or .caption file beside each image)")
    p.add_argument("--output", required=True, help="the label JSON to write")
    return p


def run(args) -> dict:
    out = Path(args.output)
    if out.suffix != ".json":
        raise DataError(f"--output must be a .json file, got {out}")
    source = CSVSource(args.captions_csv, args.image_dir) if args.captions_csv else CaptionFolderSource(args.image_dir)
    items, skipped = label_items(source)
    if not items:
        raise DataError(f"no readable image in {args.image_dir}" +
                        (f" (first: {skipped[0].path}: {skipped[0].reason})" if skipped else ""))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(items, indent=1, ensure_ascii=False))
    os.replace(tmp, out)
    print(f"wrote {out}: {len(items)} entries" + (f"; skipped {len(skipped)}: " + "; ".join(
        f"{s.path} ({s.reason})" for s in skipped[:5]) if skipped else ""))
    return {"entries": len(items), "skipped": [(s.path, s.reason) for s in skipped]}
