"""The self-check: is this install right on this machine (its device, MindSpore, CANN)?

Small models of every architecture we ship (PixArt-α, α-1024 micro-conditions, Σ, Σ with KV compression, LoRA,
the ControlNet, T5, the SD and SDXL VAEs), with fixed weights, run forward, a few steps of every sampler and one
training step with and without recompute, in each requested dtype and execution mode, on the device; their
outputs are compared with PyTorch references stored in the repository (tests/data/selfcheck/, made by
tools/make_selfcheck_refs.py).

    fixtures   the fixed weights and inputs (identical on every machine) and the small configurations
    checks     what runs on the device, one `Check` per row; `register` adds one
    plan       which checks and kernels the current device gets, from `pixart.backend`'s selection
    runner     TOLERANCES (per dtype), running, comparing, the table
    parallel   the training step on two ranks under msrun

tools/selfcheck.py is `pixart.cli.selfcheck`; the references are made by tools/make_selfcheck_refs.py.
"""
