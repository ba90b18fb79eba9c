"""What compare.py compares, and how its tables and CSVs are laid out: methods, ablation settings, columns."""

from __future__ import annotations

from tcurlora_seg.adapters.backbones import BACKBONES

# The order of the paper's Table 1: references first, the rivals, tCURLoRA last; then training from scratch (no
# transfer, issue 29), last so that a sweep's first run is one that pretrains the demo's source model when needed.
METHODS = ["full", "decoder_only", "lora", "dora", "pissa", "loha", "lokr", "curlora", "lora_pt", "tcurlora", "scratch"]
SCRATCH = "scratch"  # (engine.run.SCRATCH; not imported from there: the engine imports MONAI)
# nnU-Net trained on the same cases by its own pipeline (another tool's rows in comparison.csv, same columns)
NNUNET = "nnunet"
# The tables' order: the levels without transfer (zero-shot, scratch, nnU-Net) above the transfer methods.
ORDER = ["zero_shot", SCRATCH, NNUNET, *(m for m in METHODS if m != SCRATCH)]
RANKS = [1, 2, 4, 8, 16]
GROUPS = {"attn": ["attn"], "mlp": ["mlp_up", "mlp_down"], "all": ["attn", "mlp_up", "mlp_down"]}
# The paired baseline: every method trains the decoder as decoder-only does, plus its own part of the encoder, and
# with common random numbers (the trainer reseeds after building the model; the training loader has a generator of
# its own) a seed gives every method the same case order, crops and flips, so Dice minus decoder-only's Dice at the
# same seed is the method's own effect (and, for methods that draw random numbers in their forward pass, such as
# peft's LoHa and LoKr, that of their other ViT dropout masks).
REFERENCE = "decoder_only"
PAIRED = "dice_vs_decoder_only"
# The pretrained source model itself, evaluated by every run on the same test split before it trains
# (eval_pretrained/): one row per seed in every table, so that a method below it shows as such.
ZERO_SHOT = "zero_shot"
VS_ZERO_SHOT = "dice_vs_zero_shot"
# HD95 under two definitions (engine.evaluate.COMPONENT_VARIANTS): "hd95" with every predicted component,
# "hd95_cc1000" after removing components < 1000 mm³ (the paper's); "dice" is the run's own evaluation protocol
# (its "min_component_mm3"), "dice_cc1000" after the removal. "metrics_csv": the per-case file the statistics read.
# "shots": the run's number of training cases (its split.json; a shots sweep's k, data.split.shots).
FIELDS = ["method", "setting", "rank", "groups", "shots", "seed", "lr", "adapter_lr", "val_dice", "selected", "dice", PAIRED, VS_ZERO_SHOT,
          "hd95", "hd95_cc1000", "dice_cc1000", "min_component_mm3", "vit_change_pct", "trainable", "adapter_mb",
          "step_time_s", "peak_memory_mb", "run_dir", "metrics_csv"]
METRICS = ["trainable", "adapter_mb", "dice", PAIRED, VS_ZERO_SHOT, "hd95", "hd95_cc1000", "vit_change_pct", "step_time_s",
           "peak_memory_mb"]
# Each paired Δ's uncertainty (compare.stats, over the per-case Dice): the entry keys of its bootstrap interval and
# its Wilcoxon p-value, and the method it is paired with.
UNCERTAINTY = {PAIRED: ("ci_vs_decoder_only", "p_vs_decoder_only", REFERENCE),
               VS_ZERO_SHOT: ("ci_vs_zero_shot", "p_vs_zero_shot", ZERO_SHOT)}
# The default adapter-lr grid of --adapter-lrs with no values: 1e-4 ... 1e-1 in half decades.
ADAPTER_LRS = [1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1]
# (header, metric, scale, decimals, ± std) of the Markdown tables. Sizes are fixed by the method, so no ± for them.
# The ablation counts parameters one by one: ranks differ by a few hundred parameters next to the decoder's millions.
# ("above decoder-only" is a count, "k/n seeds", not a mean; the CI and p cells are written by tables.uncertainty.)
_REST = [("adapter MB", "adapter_mb", 1, 2, False), ("Dice %", "dice", 1, 2, True),
         ("Δ Dice vs decoder-only", PAIRED, 1, 2, True, True), ("above decoder-only", "above_reference"),
         ("95 % CI vs decoder-only", "ci_vs_decoder_only"), ("Wilcoxon p vs decoder-only", "p_vs_decoder_only"),
         ("Δ Dice vs zero-shot", VS_ZERO_SHOT, 1, 2, True, True),
         ("95 % CI vs zero-shot", "ci_vs_zero_shot"), ("Wilcoxon p vs zero-shot", "p_vs_zero_shot"),
         ("HD95 mm, all components", "hd95", 1, 2, True), ("HD95 mm, components < 1 cm³ removed", "hd95_cc1000", 1, 2, True),
         ("ViT change %", "vit_change_pct", 1, 2, True), ("s/step", "step_time_s", 1, 3, True),
         ("peak MB", "peak_memory_mb", 1, 0, True)]
COLUMNS = {"comparison": [("lr", "lr_cell"), ("adapter lr", "adapter_lr_cell"),
                          ("trainable params (M)", "trainable", 1e-6, 3, False), *_REST],
           "ablation": [("trainable params", "trainable", 1, 0, False), *_REST]}
COLUMNS["attribution"] = COLUMNS["comparison"]
SWEEPS = {"runs": "comparison", "ablation": "ablation", "attribution": "attribution"}  # sweep folder -> output stem
KEYS = {"comparison": ["method"], "ablation": ["rank", "groups"], "attribution": ["setting"]}
# Where full fine-tuning's gain comes from: one frozen part at a time trains fully (peft.train_extra, at the decoder's
# lr) on top of decoder-only or tCURLoRA; the table sets them beside the comparison's decoder-only and full runs.
# Labels (sweep folders) are the same for both backbones; "vit_blocks" are the transformer's blocks (Swin: every stage).
def attribution(backbone: str = "unetr") -> dict[str, tuple[str, list[str]]]:
    """label -> (method, modules that train fully on top) for the backbone's parts (adapters.backbones)."""
    parts = BACKBONES[backbone]
    skip = list(parts.encoders)
    return {"decoder_only+skip_encoders": ("decoder_only", skip),
            "decoder_only+patch_embedding": ("decoder_only", [parts.patch_embedding]),
            "decoder_only+vit_blocks": ("decoder_only", list(parts.stages)),
            "tcurlora+skip_encoders": ("tcurlora", skip)}


ATTRIBUTION = attribution("unetr")
