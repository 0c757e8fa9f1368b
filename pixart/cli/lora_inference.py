"""What `pixart/lora-finetuning/inference_pixart_lora.py` does: sample.py's generation with a LoRA applied, the base
model named by a diffusers pipeline folder (--model_id, the reference port's flags and defaults) or by sample.py's
model flags."""
from __future__ import annotations

from pathlib import Path

from pixart.cli.options import option_group
from pixart.cli.sample import (SampleError, check_args, generation_kwargs, load_pipeline, negative_prompts,
                               read_prompts)
from pixart.cli.sample import build_parser as sample_parser
from pixart.pipelines.loading import resolve_pipeline_folder
from pixart.pipelines.outputs import provenance, save_images

DEFAULT_MODEL_ID = "PixArt-alpha/PixArt-XL-2-512x512"  # the reference port's defaults
DEFAULT_PROMPT = "A grass-type Pokemon in a forest"
DEFAULT_OUTPUT = "./pokemon.png"


def build_parser(description: str | None = None):
    """sample.py's options, plus --model_id; --model defaults to the pipeline folder's preset."""
    parser = sample_parser(description)
    option_group(parser, "model").add_argument(
        "--model_id", default=DEFAULT_MODEL_ID,
        help="diffusers pipeline folder of the base model; a Hugging Face id is looked up as that folder, or as "
             "models/<name> (download it first); not used when --checkpoint is given")
    parser.set_defaults(model=None, checkpoint=None, prompt=[DEFAULT_PROMPT], output_path=DEFAULT_OUTPUT)
    return parser


def pipeline_folder(model_id: str) -> Path | None:
    """The local folder of --model_id: the path itself, or models/<last part> for a hub id."""
    for candidate in (Path(model_id), Path("models") / Path(model_id).name):
        if candidate.is_dir():
            return candidate
    return None


def run(args, log=print) -> list[Path]:
    if not args.lora_path:
        raise SampleError("--lora_path is required (a LoRA file or folder; sample.py runs without one)")
    for name in ("use_parallel", "imagegrid"):
        if getattr(args, name):
            raise SampleError(f"--{name} is sample.py's (this script writes --output_path only): run sample.py "
                              "--lora_path ... for it")
    if not args.checkpoint:  # the base model is the diffusers pipeline folder of --model_id
        folder = pipeline_folder(args.model_id)
        if folder is None:
            raise SampleError(f"--model_id {args.model_id}: no such local folder, nor models/{Path(args.model_id).name} "
                              f"(download the diffusers pipeline, e.g. huggingface-cli download {args.model_id} "
                              f"--local-dir models/{Path(args.model_id).name}; this port reads no hub)")
        for name, value in resolve_pipeline_folder(folder, args.model).items():
            setattr(args, name, value)
    prompts = read_prompts(args, log)
    negatives = negative_prompts(args, prompts)
    check_args(args, log)
    pipe = load_pipeline(args, log)
    output = Path(args.output_path)
    output = output if output.suffix.lower() == ".png" else output / Path(DEFAULT_OUTPUT).name
    output.parent.mkdir(parents=True, exist_ok=True)
    copies = args.num_images_per_prompt * args.num_trials
    total = len(prompts) * copies

    def path_for(k: int) -> Path:
        return output if total == 1 else output.with_name(f"{output.stem}-{k}{output.suffix}")

    made_by = provenance(args.model, args.checkpoint, args.lora_path, args.lora_scale)
    written: list[Path] = []
    for i, (prompt, negative) in enumerate(zip(prompts, negatives)):
        for t in range(args.num_trials):
            result = pipe(prompt, negative_prompt=negative, seed=args.seed + (t * len(prompts) + i) * copies,
                          **generation_kwargs(args, pipe))
            first = len(written)
            written += save_images(result, lambda j, _: path_for(first + j), made_by, log)
    return written
