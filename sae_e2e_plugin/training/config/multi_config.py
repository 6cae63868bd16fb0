"""``E2EMultiRunnerConfig``: several SAEs in one e2e run, in the shape of SAELens' multi runner.

SAELens' ``MultiSAETrainingRunnerConfig`` takes ``saes={name: TrainingSAEConfig}`` and
``hook_names={name: hook} | hook``; this config takes the same two fields on top of every
``E2ERunnerConfig`` field, plus ``splice`` (how the SAEs are spliced into the model). The
single-SAE fields ``sae`` and ``hook_name`` are derived from the first entry: SAELens' own
machinery (the activation store, the held-out tokens) reads them, and the first SAE of a
one-SAE run is built exactly as a single run builds its SAE.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from sae_lens import LoggingConfig
from sae_lens.registry import get_sae_training_class
from sae_lens.saes.sae import T_TRAINING_SAE_CONFIG, TrainingSAEConfig

from sae_e2e_plugin.run_files import CHECKPOINTS_DIRNAME
from sae_e2e_plugin.training.config.e2e_config import E2ERunnerConfig, check_sae_supported
from sae_e2e_plugin.training.config.output_hooks import check_output_hooks, multi_field_names
from sae_e2e_plugin.training.objectives import available_objectives, get_objective

_SAELENS_DEFAULT_HOOK = "blocks.0.hook_mlp_out"


@dataclass
class E2EMultiRunnerConfig(E2ERunnerConfig[T_TRAINING_SAE_CONFIG]):
    """Several SAEs trained in one run; every ``E2ERunnerConfig`` field applies to each of them.

    Each SAE keeps its own optimizer, LR and coefficient schedules, dead-feature statistics and
    activation scaler, as in SAELens' ``MultiSAETrainingRunner``.
    """

    sae: T_TRAINING_SAE_CONFIG = None  # type: ignore[assignment]
    """Derived: the first entry of ``saes`` (leave unset)."""

    saes: Mapping[str, TrainingSAEConfig] = field(default_factory=dict)
    """The SAEs by name. A name is the SAE's folder under ``output_path`` (``<output_path>/<name>``)."""

    hook_names: Mapping[str, str] | str = field(default_factory=dict)
    """Each SAE's hook by name, or one hook for every SAE (``splice="independent"`` only).
    ``hook_name`` is derived from it (leave it unset)."""

    hook_names_out: Mapping[str, str] = field(default_factory=dict)
    """Each transcoder's output hook by SAE name (``hook_name_out`` of a one-SAE run): every
    SAE whose config is a transcoder (has ``d_out``) is named here, no other. In
    ``splice="joint"`` each transcoder reads the MLP input arriving in the patched run and its
    output replaces that MLP's output."""

    splice: Literal["joint", "independent"] = "independent"
    """"joint": every SAE spliced into one patched run, one KL for all; each SAE reads the
    activation its predecessors' reconstructions produced. "independent": each SAE spliced
    alone into its own continuation from a shared prefix and one shared clean run — the same
    SAEs as one run per SAE, for less compute. See docs/multi_sae.md."""

    share_clean_log_probs: bool = True
    """``splice="independent"`` with a KL objective: make the clean run's next-token
    log-probabilities once per batch and let every SAE's KL read them, instead of each KL
    running the model's head on the clean residual again (saves one head pass per chunk
    for every SAE after the first; same numbers bit for bit). Costs 4 bytes × batch tokens
    × vocab of memory for the step (e.g. 0.75 GiB for 4,096 tokens of a 49,152-token
    vocabulary); set False where that does not fit."""

    pretrained_saes: Mapping[str, str] = field(default_factory=dict)
    """Start SAEs from pretrained ones, ``{name: source}``: each source as ``pretrained_sae``
    takes it (a local folder in SAELens' or the reference implementation's format, a hub repo,
    a SAELens release). SAEs not named here start from SAELens' initialisation."""

    pretrained_sae_ids: Mapping[str, str] = field(default_factory=dict)
    """The SAE within each ``pretrained_saes`` source, ``{name: id}``, as ``pretrained_sae_id``
    (a release's SAE id, the folder inside a hub repo, a reference run's hook)."""

    def __post_init__(self) -> None:
        if self.sae is not None:
            raise ValueError(
                "sae is set on an E2EMultiRunnerConfig; give every SAE in saes={name: config} "
                "(sae is derived from its first entry)."
            )
        self.hook_names_per_sae = _hooks_per_sae(self.saes, self.hook_names)
        """``hook_names`` as one hook per SAE name."""
        first = next(iter(self.saes))
        if self.hook_name not in (_SAELENS_DEFAULT_HOOK, self.hook_names_per_sae[first]):
            raise ValueError(
                f"hook_name={self.hook_name!r} is set on an E2EMultiRunnerConfig; hook_name is "
                "derived from hook_names. Give each SAE's hook in hook_names={name: hook}."
            )
        self.sae = self.saes[first]  # type: ignore[assignment]
        self.hook_name = self.hook_names_per_sae[first]
        super().__post_init__()
        validate_multi_config(self)

    def to_dict(self) -> dict[str, Any]:
        """SAELens' dict with each SAE's config as its own dict (JSON-ready)."""
        d = super().to_dict()
        d["saes"] = {name: cfg.to_dict() for name, cfg in self.saes.items()}
        d["hook_names"] = dict(self.hook_names_per_sae)
        d["hook_names_out"] = dict(self.hook_names_out)
        d.pop("sae", None)
        d.pop("hook_names_per_sae", None)
        return d

    @classmethod
    def from_dict(cls, cfg_dict: dict[str, Any]) -> E2EMultiRunnerConfig[Any]:  # type: ignore[override]
        """Rebuild a config from ``to_dict()`` output (e.g. a run's ``runner_cfg.json``)."""
        fields = dict(cfg_dict)
        saes = {
            name: get_sae_training_class(sae["architecture"])[1].from_dict(sae)
            for name, sae in fields.pop("saes").items()
        }
        if isinstance(fields.get("seqpos_slice"), list):
            fields["seqpos_slice"] = tuple(fields["seqpos_slice"])
        fields.pop("tokens_per_buffer", None)
        logger = LoggingConfig(**fields.pop("logger"))
        cfg = cls(saes=saes, logger=logger, **fields)
        # __post_init__ moves a default checkpoint_path; keep the one the dict records.
        if "checkpoint_path" in cfg_dict:
            cfg.checkpoint_path = cfg_dict["checkpoint_path"]
        return cfg


def _hooks_per_sae(
    saes: Mapping[str, TrainingSAEConfig], hook_names: Mapping[str, str] | str
) -> dict[str, str]:
    if not isinstance(saes, Mapping) or not saes:
        raise ValueError(
            f"saes={saes!r} is not a non-empty mapping; give saes={{name: TrainingSAEConfig}}, "
            "e.g. saes={'layer2': StandardTrainingSAEConfig(d_in=768, d_sae=12288)}."
        )
    for name, cfg in saes.items():
        _check_name(name)
        if not isinstance(cfg, TrainingSAEConfig):
            raise ValueError(
                f"saes[{name!r}] is a {type(cfg).__name__}, not a SAELens TrainingSAEConfig "
                "(e.g. StandardTrainingSAEConfig, TopKTrainingSAEConfig)."
            )
    if isinstance(hook_names, str):
        return dict.fromkeys(saes, hook_names)
    extra = sorted(set(hook_names) - set(saes))
    missing = sorted(set(saes) - set(hook_names))
    if extra or missing:
        raise ValueError(
            f"hook_names must name the same SAEs as saes; extra: {extra}, missing: {missing}. "
            "Give one hook per SAE name, or a single hook string for all of them."
        )
    return {name: hook_names[name] for name in saes}


def _check_name(name: Any) -> None:
    # A name becomes a folder under output_path and under each checkpoint.
    ok = (
        isinstance(name, str)
        and name not in ("", ".", "..", CHECKPOINTS_DIRNAME)
        and not name.startswith(".")
        and "/" not in name
        and "\\" not in name
    )
    if not ok:
        raise ValueError(
            f"saes has the name {name!r}; a name is the SAE's folder under output_path, so use "
            f"a plain folder name (no '/', not starting with '.', not {CHECKPOINTS_DIRNAME!r}), "
            "e.g. 'layer6'."
        )


def validate_multi_config(cfg: E2EMultiRunnerConfig[Any]) -> None:
    """What several SAEs in one run cannot do (yet), naming the field and the fix."""
    if cfg.splice not in ("joint", "independent"):
        raise ValueError(
            f"splice={cfg.splice!r} is not a splice mode; use 'joint' or 'independent'."
        )
    if cfg.hook_name_out is not None:
        raise ValueError(
            f"hook_name_out={cfg.hook_name_out!r} is set on an E2EMultiRunnerConfig; give each "
            "transcoder's output hook in hook_names_out={name: hook}."
        )
    if not isinstance(cfg.hook_names_out, Mapping):
        raise ValueError(
            f"hook_names_out={cfg.hook_names_out!r} is not a mapping; give each transcoder's "
            "output hook by SAE name, hook_names_out={name: hook}."
        )
    extra = sorted(set(cfg.hook_names_out) - set(cfg.saes))
    if extra:
        raise ValueError(
            f"hook_names_out names {extra}, which are not in saes {list(cfg.saes)}; use the "
            "names of saes."
        )
    check_output_hooks(cfg.saes, cfg.hook_names_out, multi_field_names)
    for name, sae_cfg in cfg.saes.items():
        check_sae_supported(sae_cfg, f"saes[{name!r}].")
    refusals = [
        (
            cfg.pretrained_sae is not None or cfg.from_pretrained_path is not None,
            "pretrained_sae / from_pretrained_path",
            "start each SAE from its own pretrained one with pretrained_saes={name: source} "
            "(and pretrained_sae_ids={name: id})",
        ),
    ]
    _check_pretrained(cfg)
    if cfg.splice == "joint":
        refusals += [
            (
                not _has_joint_form(cfg.loss),
                f"loss={cfg.loss!r}",
                "a joint splice needs the objective's joint form (register_objective(..., "
                "terms=...)), which this objective lacks; use 'local', 'e2e', 'e2e_downstream' "
                "or splice='independent', which runs any registered objective per SAE",
            ),
            (
                cfg.kl_mse_balance != "fixed",
                f"kl_mse_balance={cfg.kl_mse_balance!r}",
                "one KL is shared by every SAE, so there is no single MSE to balance it "
                "against; use kl_mse_balance='fixed' or splice='independent'",
            ),
        ]
    for refused, setting, fix in refusals:
        if refused:
            raise ValueError(f"{setting} is not supported with several SAEs per run: {fix}.")


def _has_joint_form(loss: str) -> bool:
    # An unknown name is refused by the objective's own lookup, with the choices.
    return loss not in available_objectives() or get_objective(loss).terms is not None


def _check_pretrained(cfg: E2EMultiRunnerConfig[Any]) -> None:
    for field_name, mapping, names in (
        ("pretrained_saes", cfg.pretrained_saes, list(cfg.saes)),
        ("pretrained_sae_ids", cfg.pretrained_sae_ids, list(cfg.pretrained_saes)),
    ):
        if not isinstance(mapping, Mapping):
            raise ValueError(
                f"{field_name}={mapping!r} is not a mapping; give {{name: value}} with names "
                f"from {names}."
            )
        unknown = [name for name in mapping if name not in names]
        if unknown:
            raise ValueError(
                f"{field_name} names {unknown}, which are not among {names}; give "
                "{name: value} with those names."
            )
        bad = [name for name, value in mapping.items() if not isinstance(value, str) or not value]
        if bad:
            raise ValueError(
                f"{field_name} names {bad}, which have no source string; give each a folder, "
                "a hub repo or a SAELens release (and its id in pretrained_sae_ids)."
            )
