"""DreamBooth data (diffusers' `train_dreambooth*.py` layout): a folder of instance images that all share one
prompt (`--instance_data_dir`, `--instance_prompt`) and, for prior preservation, a folder of class images that all
share the class prompt (`--class_data_dir`, `--class_prompt`, the first `--num_class_images` of them).

Each folder is a `Source` of the data layer (`pixart.data.sources`), so buckets, corrupt-image skipping, rank
sharding and exact resume are the data layer's own. Images are read from the folder itself (not its sub-folders),
in sorted name order; hidden files and the temporary files of an interrupted write are ignored.
"""
from __future__ import annotations

from pathlib import Path

from pixart.data.sources import IMAGE_EXTENSIONS, DataError, Record, Source, check_data_args

CLASS_IMAGE_NAME = "class_{:05d}.png"  # the names of generated class images; index k is drawn with seed k


def folder_images(folder) -> list[str]:
    """The image file names directly in `folder`, sorted (hidden and temporary files left out)."""
    return sorted(p.name for p in Path(folder).iterdir()
                  if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTENSIONS)


class PromptFolderSource(Source):
    """Every image of one folder with one prompt (`limit`: the first `limit` images in name order)."""

    def __init__(self, root, prompt: str, limit: int | None = None, what: str = "--instance_data_dir"):
        self.root, self.prompt, self.limit, self.what = Path(root), prompt, limit, what
        self.name = f"{what} {root}"
        self.skipped = []

    def check(self) -> None:
        if not self.root.is_dir():
            raise DataError(f"{self.what} not found: {self.root}")
        if not folder_images(self.root):
            raise DataError(f"{self.what} {self.root} holds no images ({', '.join(IMAGE_EXTENSIONS)})")

    def records(self) -> list[Record]:
        self.check()
        return [Record(name, self.prompt) for name in folder_images(self.root)[:self.limit]]

    def open(self, path: str):
        return self.root / path


def enabled(args) -> bool:
    """Whether the options ask for DreamBooth data."""
    return bool(getattr(args, "instance_data_dir", None))


def instance_source(args) -> PromptFolderSource:
    return PromptFolderSource(args.instance_data_dir, args.instance_prompt)


def class_source(args) -> PromptFolderSource:
    return PromptFolderSource(args.class_data_dir, args.class_prompt, args.num_class_images, "--class_data_dir")


def missing_class_images(args) -> int:
    """How many class images prior preservation still needs in --class_data_dir."""
    folder = Path(args.class_data_dir)
    have = len(folder_images(folder)) if folder.is_dir() else 0
    return max(0, args.num_class_images - have)


def check_dreambooth_args(args, flag=lambda dest: f"--{dest}", warn=None) -> None:
    """DreamBooth's option checks (before any model loads); DataError names the flag. `warn(line)` gets the
    notes on options that have no effect, as diffusers warns about them."""
    for other in ("json_path", "dataset_name", "train_data_dir"):
        if getattr(args, other, None):
            raise DataError(f"give one data source: {flag('instance_data_dir')} (DreamBooth) or {flag(other)}")
    if getattr(args, "feature_dir", None):
        raise DataError(f"{flag('feature_dir')}: DreamBooth encodes its images and prompts on the fly; drop "
                        f"{flag('feature_dir')}")
    instance_source(args).check()
    if not args.instance_prompt:
        raise DataError(f"{flag('instance_prompt')} is required with {flag('instance_data_dir')} (e.g. "
                        "'a photo of sks dog')")
    if getattr(args, "multi_scale", None):
        raise DataError(f"{flag('multi_scale')} true: DreamBooth trains square crops at the model's resolution "
                        f"(as diffusers' scripts); drop {flag('multi_scale')}")
    if args.with_prior_preservation:
        for name in ("class_data_dir", "class_prompt"):
            if not getattr(args, name):
                raise DataError(f"{flag('with_prior_preservation')} needs {flag(name)}")
        if args.num_class_images < 1:
            raise DataError(f"{flag('num_class_images')} must be >= 1, got {args.num_class_images}")
        if args.class_inference_steps < 1:
            raise DataError(f"{flag('class_inference_steps')} must be >= 1, got {args.class_inference_steps}")
        if not args.prior_loss_weight >= 0:
            raise DataError(f"{flag('prior_loss_weight')} must be >= 0, got {args.prior_loss_weight}")
        folder = Path(args.class_data_dir)
        if folder.exists() and not folder.is_dir():
            raise DataError(f"{flag('class_data_dir')} is not a folder: {folder}")
    elif warn is not None:
        for name in ("class_data_dir", "class_prompt"):
            if getattr(args, name):
                warn(f"{flag(name)} has no effect without {flag('with_prior_preservation')}")


def check_training_data(args, flag=lambda dest: f"--{dest}", warn=None) -> None:
    """The data checks of a training command line: DreamBooth's when --instance_data_dir is given, else the data
    layer's (`check_data_args`)."""
    if enabled(args):
        check_dreambooth_args(args, flag, warn)
    else:
        check_data_args(args, flag)
