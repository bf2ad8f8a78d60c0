"""Convert insertion VLMs (Qwen2.5-VL) and text LLMs (+ a Qwen2.5-VL vision tower) into CASA checkpoints.

The LLM, vision tower and projector carry over by renaming; CASA sub-layers are added and initialised so that the
converted model computes exactly what the source LLM computes on text (q/k/v copied from the block's SA, output
projection zero). Tensors are streamed one at a time into sharded safetensors in a staging folder that becomes the
output only when everything (weights, config, processor, model card, optional verification) is written.
"""

from __future__ import annotations

import datetime
import functools
import json
import re
import string
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from importlib import resources
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoTokenizer, GenerationConfig, PreTrainedConfig
from transformers.models.qwen2_vl import Qwen2VLImageProcessorPil

from . import __version__
from .casa_init import casa_starts, grow_rows
from .checkpoint_io import CheckpointReader, ShardedWriter, parse_size, staged_output
from .configuration_casa import SUPPORTED_TEXT_MODEL_TYPES, CasaConfig, every_nth_block
from .errors import OptionsError
from .modeling_casa import CasaForConditionalGeneration
from .processing_casa import DEFAULT_CHAT_TEMPLATE, CasaProcessor, add_missing_tokens

# On-disk names of the sources -> names in a CASA checkpoint. Both the legacy layout of Hub checkpoints
# (`model.layers`, `visual`) and the Transformers 5 in-memory layout (`model.language_model`, `model.visual`) are read.
TEXT_RENAMES = (
    (r"^model\.language_model\.", "model.language_model."),
    (r"^model\.(embed_tokens|layers|norm)\.", r"model.language_model.\1."),
    (r"^lm_head\.weight$", "lm_head.weight"),
)
VISION_RENAMES = ((r"^model\.visual\.", "model.visual."), (r"^visual\.", "model.visual."))


# What Qwen2.5-VL's rotary embedding uses when its config names no `mrope_section`
QWEN2_5_VL_DEFAULT_MROPE_SECTION = (16, 24, 24)


@dataclass
class ConversionReport:
    """Where every tensor went: carried over (renamed), deliberately dropped (with the reason), or created."""

    source: str
    output: str
    options: dict
    carried: dict[str, str] = field(default_factory=dict)
    dropped: dict[str, str] = field(default_factory=dict)
    created: dict[str, str] = field(default_factory=dict)
    shards: int = 0
    total_bytes: int = 0
    verification: dict | None = None

    def summary(self) -> str:
        lines = [
            f"CASA conversion of {self.source} -> {self.output}",
            f"  carried over: {len(self.carried)} tensors, created: {len(self.created)}, dropped: {len(self.dropped)}",
            f"  written: {self.total_bytes / 2**20:.1f} MiB in {self.shards} shard(s)",
        ]
        lines += [f"  dropped {name}: {reason}" for name, reason in self.dropped.items()]
        if self.verification:
            lines += [f"  verify {key}: {value}" for key, value in self.verification.items()]
        return "\n".join(lines)


def _rename(name: str, tables) -> str | None:
    for pattern, replacement in tables:
        if re.match(pattern, name):
            return re.sub(pattern, replacement, name)
    return None


def expected_shapes(config: CasaConfig) -> dict[str, tuple[int, ...]]:
    """Names and shapes of the target model's tensors, from a weightless (meta) instance."""
    with torch.device("meta"):
        model = CasaForConditionalGeneration(config)
    shapes = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    if config.tie_word_embeddings:
        shapes.pop("lm_head.weight")
    return shapes


@dataclass
class _Plan:
    """Sources of every output tensor, checked against the target's names and shapes before anything is written."""

    carried: dict[str, tuple[CheckpointReader, str]] = field(default_factory=dict)  # output -> (reader, source)
    derived: dict[str, tuple[str, str]] = field(default_factory=dict)  # output -> ("copy", output it copies)
    made: dict[str, Callable[[tuple[int, ...]], torch.Tensor]] = field(default_factory=dict)  # output -> maker
    recipes: dict[str, str] = field(default_factory=dict)  # output -> how it was created (for the report)
    dropped: dict[str, str] = field(default_factory=dict)  # source -> reason
    resized: dict[str, int] = field(default_factory=dict)  # output -> new first dimension (vocabulary growth)

    def carry(self, reader: CheckpointReader, tables, tied: bool, drop: dict[str, str] | None = None):
        """Map every tensor of `reader` through `tables`; names in `drop` go away with their reason."""
        unknown = []
        for name in reader.names():
            if drop and name in drop:
                self.dropped[name] = drop[name]
                continue
            target = _rename(name, tables)
            if target is None:
                unknown.append(name)
            elif target == "lm_head.weight" and tied:
                self.dropped[name] = "tied to model.language_model.embed_tokens.weight"
            else:
                self.carried[target] = (reader, name)
        return unknown

    def check(self, expected: dict[str, tuple[int, ...]], unknown: list[str]) -> None:
        unexpected = unknown + [self.carried[t][1] for t in self.carried if t not in expected]
        planned = set(self.carried) | set(self.derived) | set(self.made)
        missing = sorted(set(expected) - planned)
        mismatched = []
        for target, (reader, name) in self.carried.items():
            if target not in expected:
                continue
            shape = reader.shape(name)
            if target in self.resized:
                shape = (self.resized[target], *shape[1:])
            if shape != expected[target]:
                mismatched.append(f"{name} {list(shape)} (expected {list(expected[target])} for {target})")
        problems = []
        if unexpected:
            problems.append(f"unexpected tensors {sorted(unexpected)}")
        if missing:
            problems.append(f"missing tensors {missing}")
        if mismatched:
            problems.append(f"shape mismatches {mismatched}")
        if problems:
            raise ValueError("The checkpoint does not match the CASA model it should become: " + "; ".join(problems))


def _casa_init_plan(plan: _Plan, config: CasaConfig, expected: dict, casa_init: str, seed: int) -> None:
    """CASA sub-layer tensors as `casa_starts` says (random ones drawn from a generator seeded with `seed`), so the
    converted model starts as the source on text."""
    generator = torch.Generator().manual_seed(seed)
    std = config.text_config.initializer_range
    for target, start in casa_starts(expected, casa_init).items():
        if start.how == "copy":
            plan.derived[target] = ("copy", start.source)
        elif start.how == "zeros":
            plan.made[target] = torch.zeros
            plan.recipes[target] = f"zeros ({start.why})" if start.why else "zeros"
        else:
            plan.made[target] = _normal(generator, std)
            plan.recipes[target] = f"normal(0, {std})"


def _source_file(plan: _Plan, target: str) -> tuple[str, str]:
    reader, name = plan.carried[target]
    return str(reader.folder), reader.weight_map[name]


def _normal(generator: torch.Generator, std: float) -> Callable[[tuple[int, ...]], torch.Tensor]:
    return lambda shape: torch.randn(shape, generator=generator) * std


def _write(
    plan: _Plan,
    expected: dict,
    folder: Path,
    max_shard_size: str | int,
    dtype,
    report: ConversionReport,
    transforms: dict[str, Callable[[torch.Tensor], torch.Tensor]] | None = None,
) -> None:
    """Stream every planned tensor into the shards: carried ones in source order, each followed by its copies."""
    writer = ShardedWriter(folder, parse_size(max_shard_size), dtype)
    copies: dict[str, list[str]] = {}
    for target, (_, of) in plan.derived.items():
        copies.setdefault(of, []).append(target)
    transforms = transforms or {}
    reference_dtype = None
    # Read shard by shard (each source file once, released after), so only one shard's pages are ever resident.
    targets = sorted((t for t in plan.carried if t in expected), key=lambda t: _source_file(plan, t))
    for position, target in enumerate(tqdm(targets, desc="Converting tensors", unit="tensor")):
        reader, name = plan.carried[target]
        tensor = reader.get(name)
        tensor = transforms[target](tensor) if target in transforms else tensor
        reference_dtype = reference_dtype or (tensor.dtype if tensor.is_floating_point() else None)
        writer.add(target, tensor)
        report.carried[name] = target
        for copy in copies.get(target, []):
            writer.add(copy, tensor.clone())
            report.created[copy] = f"copy of {target}"
        del tensor
        if position + 1 == len(targets) or _source_file(plan, targets[position + 1]) != _source_file(plan, target):
            reader.release(reader.weight_map[name])
    for target, make in plan.made.items():
        writer.add(target, make(expected[target]).to(dtype or reference_dtype or torch.float32))
        report.created[target] = plan.recipes[target]
    report.shards = writer.close()
    report.total_bytes = writer.total_bytes
    report.dropped.update(plan.dropped)


def text_config_from_qwen2_5_vl(source: PreTrainedConfig) -> dict:
    """The Qwen2 text config equivalent to Qwen2.5-VL's language model on text-only input.

    M-RoPE with identical position rows (what text-only tokens get) is plain 1-D RoPE with the same base. Its sections
    (`mrope_section`) stay in `rope_parameters`, for `casa_image_positions="mrope"`; a source without them gets the
    ones Qwen2.5-VL's rotary embedding falls back to, `[16, 24, 24]`.
    """
    text = source.text_config
    rope = dict(text.rope_parameters or {})
    if rope.get("rope_type", "default") not in ("default", "mrope"):
        raise ValueError(f"Qwen2.5-VL text rope_type={rope.get('rope_type')!r} has no plain-RoPE equivalent")
    keep = (
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "hidden_act",
        "max_position_embeddings",
        "rms_norm_eps",
        "attention_dropout",
        "initializer_range",
        "bos_token_id",
        "eos_token_id",
        "pad_token_id",
    )
    config = {key: getattr(text, key) for key in keep if getattr(text, key, None) is not None}
    config.update(
        model_type="qwen2",
        rope_parameters={
            "rope_type": "default",
            "rope_theta": rope["rope_theta"],
            "mrope_section": list(rope.get("mrope_section", QWEN2_5_VL_DEFAULT_MROPE_SECTION)),
        },
        tie_word_embeddings=bool(source.tie_word_embeddings),
    )
    return config


def _load_config(folder: Path, what: str) -> PreTrainedConfig:
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{what} folder {folder} has no config.json")
    return AutoConfig.from_pretrained(folder)


def _chat_template(folder: Path, tokenizer) -> str | None:
    for name in ("chat_template.jinja", "chat_template.json"):
        path = folder / name
        if path.is_file():
            text = path.read_text()
            return json.loads(text)["chat_template"] if name.endswith(".json") else text
    return getattr(tokenizer, "chat_template", None)


def _image_processor(folder: Path) -> Qwen2VLImageProcessorPil:
    if not (folder / "preprocessor_config.json").is_file():
        raise FileNotFoundError(f"{folder} has no preprocessor_config.json (the Qwen2.5-VL image processor settings)")
    return Qwen2VLImageProcessorPil.from_pretrained(folder)


def _parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if not isinstance(getattr(torch, dtype, None), torch.dtype):
        raise ValueError(f"Unknown dtype {dtype!r}; use e.g. float32, bfloat16, float16")
    return getattr(torch, dtype)


@dataclass(frozen=True)
class ConversionOptions:
    """What both conversions (and `casa-hf convert`) take besides their sources and output folder."""

    casa_layers: list[int] | None = None  # blocks that get a CASA sub-layer (None: every block)
    casa_init: str = "copy"  # CASA q/k/v copied from the block's self-attention, or "random"
    shared: bool = False  # the -Shared variant
    placement: str = "parallel"  # `CasaConfig.casa_placement`: the paper's block, or CASA after self-attention
    # the paper's CA-replace layout: CASA replaces self-attention in every n-th block (`every_nth_block`), shared
    replace_every: int | None = None
    # `CasaConfig.casa_image_positions`; None: each source's default, Qwen2.5-VL's own multimodal RoPE ("mrope") for
    # a Qwen2.5-VL source, "insertion" for a text LLM (which has no mRoPE sections)
    image_positions: str | None = None
    dtype: str | torch.dtype | None = None  # of the written weights (None: the source's)
    max_shard_size: str | int = "5GB"
    overwrite: bool = False
    verify: bool = False  # compare with the source afterwards
    seed: int = 0

    def recorded(self, config: CasaConfig, **extra) -> dict:
        """The options as the report and model card record them (with the CASA layers the config resolved)."""
        kept = {name: getattr(self, name) for name in ("casa_init", "max_shard_size", "seed")}
        kept.update(shared=config.casa_shared, placement=config.casa_placement)
        resolved = dict(casa_layers=config.casa_layers, image_positions=config.casa_image_positions)
        return dict(**resolved, dtype=str(self.dtype), **kept, **extra)


def _casa_layout(options: ConversionOptions, num_layers: int) -> dict:
    """The CASA blocks, placement and sharing the options ask for; `replace_every` sets all three."""
    if options.replace_every is None:
        if options.placement == "replace" and not options.shared:
            raise OptionsError(
                "placement='replace' runs CASA on the blocks' own self-attention projections: add shared=True "
                "(--shared), or use replace_every (--replace-every N)"
            )
        return dict(casa_layers=options.casa_layers, casa_shared=options.shared, casa_placement=options.placement)
    if options.casa_layers is not None or options.placement not in ("parallel", "replace"):
        raise OptionsError(
            f"replace_every={options.replace_every} chooses the CASA blocks and their placement itself; drop "
            f"casa_layers={options.casa_layers} / placement={options.placement!r}"
        )
    blocks = every_nth_block(num_layers, options.replace_every)
    return dict(casa_layers=blocks, casa_shared=True, casa_placement="replace")


def _options(options: ConversionOptions | None, overrides: dict) -> ConversionOptions:
    unknown = sorted(set(overrides) - {f.name for f in fields(ConversionOptions)})
    if unknown:
        names = [f.name for f in fields(ConversionOptions)]
        raise TypeError(f"Unknown conversion option(s) {unknown}; the options are {names}")
    return replace(options or ConversionOptions(), **overrides)


def convert_qwen2_5_vl_to_casa(
    source: str | Path, output: str | Path, options: ConversionOptions | None = None, **overrides
) -> ConversionReport:
    """Qwen2.5-VL checkpoint folder -> CASA folder (loadable with `AutoModel` after `import casa_hf`).

    `options` (or keyword overrides of its fields, e.g. `verify=True`) as in `ConversionOptions`.
    """
    options = _options(options, overrides)
    source, output = Path(source), Path(output)
    source_config = _load_config(source, "Source")
    if source_config.model_type != "qwen2_5_vl":
        raise ValueError(f"{source} is a {source_config.model_type!r} checkpoint, not 'qwen2_5_vl'")
    text_config = text_config_from_qwen2_5_vl(source_config)
    config = CasaConfig(
        text_config=text_config,
        vision_config=source_config.vision_config.to_dict(),
        **_casa_layout(options, text_config["num_hidden_layers"]),
        casa_image_positions=options.image_positions or "mrope",
        image_token_id=source_config.image_token_id,
        vision_start_token_id=source_config.vision_start_token_id,
        vision_end_token_id=source_config.vision_end_token_id,
        tie_word_embeddings=bool(source_config.tie_word_embeddings),
    )
    config.dtype = _parse_dtype(options.dtype) or source_config.dtype  # what `from_pretrained` loads by default
    report = ConversionReport(str(source), str(output), options.recorded(config))
    expected = expected_shapes(config)
    with CheckpointReader(source) as reader, staged_output(output, options.overwrite) as staging:
        plan = _Plan()
        unknown = plan.carry(reader, TEXT_RENAMES + VISION_RENAMES, tied=config.tie_word_embeddings)
        _casa_init_plan(plan, config, expected, options.casa_init, options.seed)
        plan.check(expected, unknown)
        _write(plan, expected, staging, options.max_shard_size, _parse_dtype(options.dtype), report)

        tokenizer = AutoTokenizer.from_pretrained(source)
        processor = CasaProcessor(_image_processor(source), tokenizer, chat_template=_chat_template(source, tokenizer))
        _save_companions(staging, config, processor, _generation_config(source, config), report, "Qwen2.5-VL")
        if options.verify:
            from .verify_conversion import verify_against_qwen2_5_vl

            report.verification = verify_against_qwen2_5_vl(source, staging, exact=not config.casa_shared)
            _write_report_files(staging, report, "Qwen2.5-VL")
    return report


def convert_llm_to_casa(
    llm: str | Path,
    vision: str | Path,
    output: str | Path,
    options: ConversionOptions | None = None,
    **overrides,
) -> ConversionReport:
    """Text LLM folder (Qwen2, Llama, Helium) + the vision tower of a Qwen2.5-VL folder -> CASA (the Helium recipe).

    `llm` may also be a `.gguf` file: it is dequantized through Transformers into a temporary plain checkpoint first.

    The image placeholder and chat tokens are added to the tokenizer when missing (embedding rows: the mean of the
    existing ones); the projector's last layer is re-initialised when the LLM width differs from the source's.
    `options` (or keyword overrides of its fields) as in `ConversionOptions`.
    """
    options = _options(options, overrides)
    llm, vision, output = Path(llm), Path(vision), Path(output)
    if llm.suffix == ".gguf":
        from .smollm2.gguf_llm import gguf_as_folder

        with gguf_as_folder(llm) as folder:
            report = convert_llm_to_casa(folder, vision, output, options)
        report.source = str(llm)
        return report
    llm_config = _load_config(llm, "LLM")
    if llm_config.model_type not in SUPPORTED_TEXT_MODEL_TYPES:
        raise ValueError(f"{llm} is a {llm_config.model_type!r} model; supported LLMs: {SUPPORTED_TEXT_MODEL_TYPES}")
    vision_config = _load_config(vision, "Vision source")
    if vision_config.model_type != "qwen2_5_vl":
        raise ValueError(f"{vision} is a {vision_config.model_type!r} checkpoint, not 'qwen2_5_vl'")

    tokenizer = AutoTokenizer.from_pretrained(llm)
    missing_tokens = add_missing_tokens(tokenizer)
    old_vocab = llm_config.vocab_size
    new_vocab = max(old_vocab, len(tokenizer))
    text_config = {**llm_config.to_dict(), "vocab_size": new_vocab}
    hidden = llm_config.hidden_size
    vision_dict = {**vision_config.vision_config.to_dict(), "out_hidden_size": hidden}
    config = CasaConfig(
        text_config=text_config,
        vision_config=vision_dict,
        **_casa_layout(options, llm_config.num_hidden_layers),
        casa_image_positions=options.image_positions or "insertion",
        image_token_id=tokenizer.convert_tokens_to_ids("<|image_pad|>"),
        vision_start_token_id=tokenizer.convert_tokens_to_ids("<|vision_start|>"),
        vision_end_token_id=tokenizer.convert_tokens_to_ids("<|vision_end|>"),
        tie_word_embeddings=bool(llm_config.tie_word_embeddings),
    )
    config.dtype = _parse_dtype(options.dtype) or llm_config.dtype
    recorded = options.recorded(config, vision_source=str(vision), added_tokens=missing_tokens)
    report = ConversionReport(str(llm), str(output), recorded)
    expected = expected_shapes(config)
    resize = functools.partial(grow_rows, rows=new_vocab) if new_vocab > old_vocab else None
    with (
        CheckpointReader(llm) as llm_reader,
        CheckpointReader(vision) as vision_reader,
        staged_output(output, options.overwrite) as staging,
    ):
        plan = _Plan()
        unknown = plan.carry(llm_reader, TEXT_RENAMES, tied=config.tie_word_embeddings)
        source_width = vision_config.vision_config.out_hidden_size
        drop = {
            name: "language model of the vision source"
            for name in vision_reader.names()
            if _rename(name, VISION_RENAMES) is None
        }
        if source_width != hidden:
            merger_out = [n for n in vision_reader.names() if re.search(r"merger\.mlp\.2\.(weight|bias)$", n)]
            drop.update(dict.fromkeys(merger_out, f"projector output sized for width {source_width}, not {hidden}"))
            std = config.text_config.initializer_range
            generator = torch.Generator().manual_seed(options.seed + 1)
            plan.made["model.visual.merger.mlp.2.weight"] = _normal(generator, std)
            plan.recipes["model.visual.merger.mlp.2.weight"] = f"normal(0, {std}) (projector resized to the LLM)"
            plan.made["model.visual.merger.mlp.2.bias"] = torch.zeros
            plan.recipes["model.visual.merger.mlp.2.bias"] = "zeros (projector resized to the LLM)"
        unknown += plan.carry(vision_reader, VISION_RENAMES, tied=False, drop=drop)
        transforms = {}
        if resize is not None:
            for target in ("model.language_model.embed_tokens.weight", "lm_head.weight"):
                if target in plan.carried:
                    plan.resized[target] = new_vocab
                    transforms[target] = resize
        _casa_init_plan(plan, config, expected, options.casa_init, options.seed)
        plan.check(expected, unknown)
        _write(plan, expected, staging, options.max_shard_size, _parse_dtype(options.dtype), report, transforms)
        for target in transforms:
            report.created[f"{target}[{old_vocab}:{new_vocab}]"] = "mean of the existing rows (added tokens)"

        chat_template = DEFAULT_CHAT_TEMPLATE
        processor = CasaProcessor(_image_processor(vision), tokenizer, chat_template=chat_template)
        generation = _generation_config(llm, config)
        im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
        eos = generation.eos_token_id if isinstance(generation.eos_token_id, list) else [generation.eos_token_id]
        generation.eos_token_id = [e for e in eos if e is not None] + [im_end]
        _save_companions(staging, config, processor, generation, report, config.text_config.model_type)
        if options.verify:
            from .verify_conversion import verify_against_llm

            report.verification = verify_against_llm(llm, staging, old_vocab, exact=not config.casa_shared)
            _write_report_files(staging, report, config.text_config.model_type)
    return report


def _generation_config(source: Path, config: CasaConfig) -> GenerationConfig:
    if (source / "generation_config.json").is_file():
        return GenerationConfig.from_pretrained(source)
    return GenerationConfig.from_model_config(config)


def _save_companions(
    staging: Path,
    config: CasaConfig,
    processor: CasaProcessor,
    generation: GenerationConfig,
    report: ConversionReport,
    source_kind: str,
) -> None:
    config.architectures = ["CasaForConditionalGeneration"]
    config.save_pretrained(staging)
    generation.save_pretrained(staging)
    processor.save_pretrained(staging)
    _write_report_files(staging, report, source_kind)


def _write_report_files(folder: Path, report: ConversionReport, source_kind: str) -> None:
    """`conversion_report.json` (every tensor's fate) and the Hub model card."""
    (folder / "conversion_report.json").write_text(json.dumps(report.__dict__, indent=1, default=str) + "\n")
    verification = ""
    if report.verification:
        verification = "\n## Verification\n\n" + "\n".join(f"- {k}: {v}" for k, v in report.verification.items())
    card = string.Template((resources.files(__package__) / "templates" / "converted_model_card.md").read_text())
    fields = dict(
        source_kind=source_kind,
        source=report.source,
        output=report.output,
        date=datetime.date.today().isoformat(),
        version=__version__,
        options=json.dumps(report.options, default=str),
        carried=len(report.carried),
        created=len(report.created),
        dropped=len(report.dropped),
        verification=verification,
    )
    (folder / "README.md").write_text(card.substitute(fields))


__all__ = ["ConversionOptions", "ConversionReport", "convert_llm_to_casa", "convert_qwen2_5_vl_to_casa"]
