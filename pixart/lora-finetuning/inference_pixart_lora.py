r"""Generate an image with a PixArt-α/Σ model and a LoRA (trained here, or with diffusers / peft).

    python pixart/lora-finetuning/inference_pixart_lora.py --model_id="PixArt-alpha/PixArt-XL-2-512x512" \
        --lora_path="output/pixart-pokemon-model/lora_checkpoint_path" \
        --prompt="A grass-type Pokemon in a forest, highly detailed" --output_path="./generated_pokemon.png"
    python pixart/lora-finetuning/inference_pixart_lora.py -c configs/inference/pixart-sigma-512-MS.yaml \
        --checkpoint models/PixArt-Sigma-XL-2-512-MS.ckpt --lora_path my-lora/pytorch_lora_weights.safetensors \
        --lora_scale 0.8 --prompt "..." --output_path out.png

--model_id is a local diffusers pipeline folder (transformer/, vae/, text_encoder/, tokenizer/): the path, or
models/<name> for a Hugging Face id; with --checkpoint the model flags are sample.py's instead. Every sample.py
option works.
"""
import sys

from pixart.cli import main as cli_main
from pixart.cli.lora_inference import build_parser, run


def main(argv=None) -> int:
    return cli_main(run, build_parser, __doc__, argv)


if __name__ == "__main__":
    sys.exit(main())
