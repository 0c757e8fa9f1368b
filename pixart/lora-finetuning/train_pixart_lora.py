r"""Train a LoRA on a pretrained PixArt-α / Σ (only the low-rank matrices learn; the base stays frozen).

    python pixart/lora-finetuning/train_pixart_lora.py --pretrained_model_name_or_path models/PixArt-XL-2-512x512 \
        --json_path data/labels.json --image_dir data/images --lorarank 16 --learning_rate 1e-4 \
        --train_batch_size 4 --max_train_steps 2000 --checkpointing_steps 500 --output_dir output/my-lora
    python pixart/lora-finetuning/train_pixart_lora.py ... --resume_from_checkpoint latest
    msrun --worker_num=8 --local_worker_num=8 pixart/lora-finetuning/train_pixart_lora.py ... --use_parallel True
    python sample.py -c configs/inference/pixart-alpha-512x512.yaml --lora_path output/my-lora --prompt "..."

--pretrained_model_name_or_path is a local diffusers pipeline folder, or transformer weights (.pth / .ckpt /
.safetensors / diffusers transformer folder) with --model, --vae_root and --text_encoder_root as for train.py.
The data flags are train.py's (label JSON, image folder, --feature_dir cache). Writes
<output_dir>/pytorch_lora_weights.safetensors (diffusers' layout) and checkpoint-N/ folders. Flags override the
YAML of -c; a YAML key that is not a flag is an error. Bad input exits 1 with one line.
"""
import sys

from pixart.cli import main as cli_main
from pixart.cli.lora_train import build_parser, run


def main(argv=None) -> int:
    return cli_main(run, build_parser, __doc__, argv)


if __name__ == "__main__":
    sys.exit(main())
