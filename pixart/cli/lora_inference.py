"""What `pixart/lora-finetuning/inference_pixart_lora.py` does: sample.py's generation with a LoRA applied, the base
model named by a diffusers pipeline folder (--model_id) or by sample.py's model flags."""
from __future__ import annotations

from pathlib import Path

from pixart.cli.options import option_group
from pixart.cli.sample import SampleError, check_args, generation_kwargs, load_pipeline, read_prompts
from pixart.cli.sample import build_parser as sample_parser
from pixart.pipelines.loading import resolve_pipeline_folder
from pixart.pipelines.outputs import provenance, save_images

DEFAULT_MODEL = "PixArt-Sigma-XL-2-1024-MS"
OUTPUT_NAME = "pixart_lora.png"


def build_parser(description: str | None = None):
    """sample.py's options, plus --model_id; --model defaults to the pipeline folder's preset."""
    parser = sample_parser(description)
    option_group(parser, "model").add_argument(
        "--model_id", default=None, help="local diffusers pipeline folder of the base model")
    parser.set_defaults(model=None, output_path=OUTPUT_NAME)
    return parser


def run(args, log=print) -> list[Path]:
    if not args.lora_path:
        raise SampleError("--lora_path is required (a LoRA file or folder; sample.py runs without one)")
    if args.model_id:
        if not Path(args.model_id).is_dir():
            raise SampleError(f"--model_id {args.model_id} is not a local folder (download the diffusers pipeline, "
                              "e.g. huggingface-cli download PixArt-alpha/PixArt-XL-2-512x512 --local-dir DIR)")
        for name, value in resolve_pipeline_folder(args.model_id, args.model).items():
            if not getattr(args, name, None):
                setattr(args, name, value)
    args.model = args.model or DEFAULT_MODEL
    prompts = read_prompts(args)
    check_args(args)
    pipe = load_pipeline(args, log)
    output = Path(args.output_path)
    output = output if output.suffix.lower() == ".png" else output / OUTPUT_NAME
    output.parent.mkdir(parents=True, exist_ok=True)
    total = len(prompts) * args.batch_size

    def path_for(k: int) -> Path:
        return output if total == 1 else output.with_name(f"{output.stem}-{k}{output.suffix}")

    made_by = provenance(args.model, args.checkpoint, args.lora_path, args.lora_scale)
    written: list[Path] = []
    for i, prompt in enumerate(prompts):
        result = pipe(prompt, seed=args.seed + i * args.batch_size, **generation_kwargs(args, pipe))
        first = len(written)
        written += save_images(result, lambda j, _: path_for(first + j), made_by, log)
    return written
