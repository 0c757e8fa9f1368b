"""Generate an image with a PixArt-α/Σ model and a LoRA (trained here, or with diffusers / peft).

    python pixart/lora-finetuning/inference_pixart_lora.py --model_id models/PixArt-XL-2-512x512 \
        --lora_path output/pixart-pokemon-model --prompt "A grass-type Pokemon in a forest" \
        --output_path generated_pokemon.png
    python pixart/lora-finetuning/inference_pixart_lora.py -c configs/inference/pixart-sigma-512-ms.yaml \
        --lora_path my-lora/pytorch_lora_weights.safetensors --lora_scale 0.8 --prompt "..." --output_path out.png

--model_id is a local diffusers pipeline folder (transformer/, vae/, text_encoder/, tokenizer/); without it the
model flags are sample.py's (--checkpoint, --model, --vae_root, --text_encoder_root). Every sample.py option works.
"""
import sys
from pathlib import Path

from pixart.config import ConfigError, parse_args
from pixart.pipelines.sample_run import (SampleError, build_parser, check_args, generation_kwargs, load_pipeline,
                                         read_prompts)


def main(argv=None) -> int:
    parser = build_parser(__doc__)
    parser.add_argument("--model_id", default=None, help="local diffusers pipeline folder of the base model")
    parser.set_defaults(model=None, output_path="pixart_lora.png")
    try:
        args = parse_args(parser, argv)
        generate(args)
    except (ConfigError, SampleError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


def generate(args, log=print) -> list[Path]:
    from pixart.pipelines.loading import resolve_pipeline_folder
    from pixart.pipelines.outputs import save_png
    if not args.lora_path:
        raise SampleError("--lora_path is required (a LoRA file or folder; sample.py runs without one)")
    if args.model_id:
        if not Path(args.model_id).is_dir():
            raise SampleError(f"--model_id {args.model_id} is not a local folder (download the diffusers pipeline, "
                              "e.g. huggingface-cli download PixArt-alpha/PixArt-XL-2-512x512 --local-dir DIR)")
        for name, value in resolve_pipeline_folder(args.model_id, args.model).items():
            if not getattr(args, name, None):
                setattr(args, name, value)
    args.model = args.model or "PixArt-Sigma-XL-2-1024-MS"
    prompts = read_prompts(args)
    check_args(args)
    pipe = load_pipeline(args, log)
    output = Path(args.output_path)
    output = output if output.suffix.lower() == ".png" else output / "pixart_lora.png"
    output.parent.mkdir(parents=True, exist_ok=True)
    images = []
    for i, prompt in enumerate(prompts):
        result = pipe(prompt, seed=args.seed + i * args.batch_size, **generation_kwargs(args, pipe))
        for image, settings in zip(result.images, result.settings):
            settings.update(model=args.model, checkpoint=str(args.checkpoint), lora=str(args.lora_path),
                            lora_scale=args.lora_scale)
            images.append((image, settings))
    written = []
    for k, (image, settings) in enumerate(images):
        path = output if len(images) == 1 else output.with_name(f"{output.stem}-{k}{output.suffix}")
        save_png(image, path, settings)
        written.append(path)
        log(f"saved {path}")
    return written


if __name__ == "__main__":
    sys.exit(main())
