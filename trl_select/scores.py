"""Per-pair scores (docs/design.md §2-3): pure functions, summed log-probabilities in, one number per pair out.

Every function here works on the CPU or any device, on float tensors of shape `(num_pairs,)`, and knows nothing about
models, ranks or trainers. Log-probabilities are in nats, summed over the completion tokens exactly as TRL's
`DPOTrainer` sums them (prompt tokens masked; with `ld_alpha`, LD-DPO's down-weighted tail, `completion_sums`), and,
with `use_weighting`, carry WPO's per-pair weight (`wpo_log_weights`). Those two functions are the only place where
per-token values become per-pair ones: every pass (scoring, aux, the training-step recorder, influence) calls them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F


# Every per-pair loss of TRL 1.16's `DPOTrainer._compute_loss` (trl/trainer/dpo_trainer.py:1386-1516), in its order.
SUPPORTED_LOSS_TYPES = (
    "sigmoid",
    "hinge",
    "ipo",
    "exo_pair",
    "nca_pair",
    "robust",
    "bco_pair",
    "sppo_hard",
    "apo_zero",
    "apo_down",
    "discopop",
    "sft",
    "sigmoid_norm",
)
# TRL's losses that a per-pair score cannot reproduce, with the reason.
UNSUPPORTED_LOSS_TYPES = {
    "aot": "it sorts the batch's log-ratios and pairs the i-th smallest of one sort with the i-th smallest of another "
    "(dpo_trainer.py:1447-1457), so a pair's term depends on the other pairs of its batch: it has no per-pair loss",
    "aot_unpaired": "it sorts the chosen and the rejected log-ratios of the batch separately and pairs them by rank "
    "(dpo_trainer.py:1458-1466), so a pair's term depends on the other pairs of its batch: it has no per-pair loss",
}
# The losses whose TRL expression reads `label_smoothing` (dpo_trainer.py:1410, 1429-1431; also `aot*`, refused).
LABEL_SMOOTHING_LOSS_TYPES = ("exo_pair", "robust")
# The losses TRL accepts with an `f_divergence_type` other than `reverse_kl` (dpo_trainer.py:810).
F_DIVERGENCE_LOSS_TYPES = ("sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust", "discopop", "sft")
F_DIVERGENCE_TYPES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")
# The losses that read completion lengths (token counts), not only summed log-probs.
LENGTH_LOSS_TYPES = ("ipo", "sigmoid_norm", "sft")


def completion_sums(
    per_token_logps: torch.Tensor, shift_completion_mask: torch.Tensor, ld_alpha: float | None = None
) -> torch.Tensor:
    """Per-sequence summed completion log-probs, exactly as TRL 1.16's `DPOTrainer` forms them, nats.

    `per_token_logps` is the fused LM head's `log_probs` (zero outside the completion), shape `(2B, T-1)`, rows
    `[chosen..., rejected...]` (the preference collator's order); `shift_completion_mask` is `completion_mask[..., 1:]`
    of the same batch. Returns shape `(2B,)`:

    - `ld_alpha=None`: `Σ_t log π(y_t)`, the plain sum (dpo_trainer.py:1303, 1269);
    - LD-DPO: `Σ_{t ≤ s} log π(y_t) + α Σ_{t > s} log π(y_t)`, with `t` the token's position in its completion
      (1-based) and `s = min(n_w, n_l)` the pair's shared length, `n` the scored completion tokens
      (dpo_trainer.py:1303-1315 for θ, 1269-1281 for π_ref, 1340-1346 for the live reference).

    The sum runs over the whole row like TRL's, so a batch padded to another width gives the same value per pair.
    """
    if ld_alpha is None:
        return per_token_logps.sum(dim=1)
    comp_pos = shift_completion_mask.cumsum(dim=1)
    comp_lens = shift_completion_mask.sum(dim=1).long()
    chosen_lens, rejected_lens = comp_lens.chunk(2, dim=0)
    shared_lens = torch.minimum(chosen_lens, rejected_lens)
    shared_lens = torch.cat([shared_lens, shared_lens], dim=0).to(per_token_logps.device)
    shared_mask = (comp_pos > 0) & (comp_pos <= shared_lens.unsqueeze(1))  # shared: 1 <= pos <= shared_len
    tail_mask = comp_pos > shared_lens.unsqueeze(1)  # tail: pos > shared_len
    shared_logps = (per_token_logps * shared_mask).sum(dim=1)
    tail_logps = (per_token_logps * tail_mask).sum(dim=1)
    return shared_logps + ld_alpha * tail_logps


def wpo_log_weights(
    per_token_logps: torch.Tensor, log_sum_sq_probs: torch.Tensor, shift_completion_mask: torch.Tensor
) -> torch.Tensor:
    """WPO's per-pair weight, as a log: `log w = ā_w + ā_l`, shape `(B,)`, nats (no gradient).

    TRL 1.16 (dpo_trainer.py:1518-1526, Eq. 2 of the WPO paper) multiplies every loss term of pair `z` by
    `w(z) = exp(ā_w) · exp(ā_l)`, where `ā = Σ_t [log π(y_t) - log Σ_v π(v)²] / n` is the mean "aligned" log-prob of a
    completion over its `n` scored tokens (`n` clamped to ≥ 1), computed under `no_grad` from the very forward whose
    loss it weights. The inputs are that forward's `log_probs` and `log_sum_sq_probs` (the fused LM head's outputs,
    zero outside the completion), shape `(2B, T-1)`, `[chosen..., rejected...]`, and `completion_mask[..., 1:]`.
    Not LD-weighted: TRL uses the raw per-token log-probs here whatever `ld_alpha`.
    """
    with torch.no_grad():
        completion_lengths = shift_completion_mask.sum(dim=1).clamp_min(1)
        aligned = (per_token_logps - log_sum_sq_probs) * shift_completion_mask
        mean_aligned = aligned.sum(dim=1) / completion_lengths
        chosen, rejected = mean_aligned.chunk(2, dim=0)
        return (chosen + rejected).detach()


@dataclass(frozen=True)
class PairLogProbs:
    """Summed completion log-probabilities of one model over a pool of pairs.

    Attributes:
        chosen (`torch.Tensor`):
            `log π(y_w|x)` per pair, shape `(num_pairs,)`, nats (LD-weighted with `ld_alpha`, `completion_sums`).
        rejected (`torch.Tensor`):
            `log π(y_l|x)` per pair, shape `(num_pairs,)`, nats.
        log_weight (`torch.Tensor`, *optional*):
            WPO's `log w(z)` per pair under this model (`wpo_log_weights`), shape `(num_pairs,)`, nats; only for a
            model whose loss is evaluated (θ_t, θ_aux) when `use_weighting`, `None` otherwise (π_ref never has one).
    """

    chosen: torch.Tensor
    rejected: torch.Tensor
    log_weight: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.chosen.shape != self.rejected.shape or self.chosen.dim() != 1:
            raise ValueError(
                f"`chosen` and `rejected` must be 1-D tensors of the same shape, got {tuple(self.chosen.shape)} and "
                f"{tuple(self.rejected.shape)}."
            )
        if self.log_weight is not None and self.log_weight.shape != self.chosen.shape:
            raise ValueError(
                f"`log_weight` must have the shape of `chosen` {tuple(self.chosen.shape)}, got "
                f"{tuple(self.log_weight.shape)}."
            )

    def __len__(self) -> int:
        return self.chosen.numel()

    def fields(self) -> dict[str, torch.Tensor]:
        """The tensors it holds by name (`log_weight` only when set), e.g. for a checkpoint or a gather."""
        named = {"chosen": self.chosen, "rejected": self.rejected}
        if self.log_weight is not None:
            named["log_weight"] = self.log_weight
        return named

    def take(self, rows: Any) -> PairLogProbs:
        """The values of rows `rows` (an index tensor or list), in that order."""
        index = torch.as_tensor(rows, dtype=torch.long)
        weight = None if self.log_weight is None else self.log_weight[index]
        return PairLogProbs(self.chosen[index], self.rejected[index], weight)


@dataclass(frozen=True)
class CompletionLengths:
    """Completion token counts of a pool of pairs, as TRL's preference collator builds them (after truncation).

    Attributes:
        chosen (`torch.Tensor`):
            Tokens of `y_w` in the training sequence, `completion_mask.sum(dim=1)` of the chosen row, shape
            `(num_pairs,)`, tokens.
        rejected (`torch.Tensor`):
            The same for `y_l`.
        chosen_scored (`torch.Tensor`):
            Tokens of `y_w` that have a log-prob, `completion_mask[..., 1:].sum(dim=1)`: `chosen` less one when the
            sequence starts with a completion token (an empty or truncated-away prompt), which no token predicts.
    """

    chosen: torch.Tensor
    rejected: torch.Tensor
    chosen_scored: torch.Tensor

    def __len__(self) -> int:
        return self.chosen.numel()

    def select(self, rows: Any) -> CompletionLengths:
        """The lengths of pool rows `rows` (an index tensor or list), in that order."""
        rows = torch.as_tensor(rows, dtype=torch.long)
        return CompletionLengths(self.chosen[rows], self.rejected[rows], self.chosen_scored[rows])

    def to(self, device: torch.device | str) -> CompletionLengths:
        return CompletionLengths(self.chosen.to(device), self.rejected.to(device), self.chosen_scored.to(device))


def completion_lengths(
    prompt: Sequence[int],
    chosen: Sequence[int],
    rejected: Sequence[int],
    max_length: int | None,
    truncation_mode: str = "keep_start",
) -> CompletionLengths:
    """Completion token counts per pair from the tokenized lengths `P`, `C`, `R` (TRL's `prompt_ids`, `chosen_ids`,
    `rejected_ids`), truncated as TRL's `DataCollatorForPreference` truncates each `prompt + completion` sequence to
    `max_length` L (dpo_trainer.py:151-161):

    - `keep_start` keeps the first L tokens: `C' = clamp(min(P + C, L) - P, 0)`, prompt `P' = min(P, L)`;
    - `keep_end` keeps the last L: `C' = min(C, L)`, `P' = P` if `P + C ≤ L` else `max(L - C, 0)`.

    The scored count is `C' - 1` when `P' = 0` (the first token has no log-prob), else `C'`.
    """
    p, c, r = (torch.as_tensor(list(x), dtype=torch.long) for x in (prompt, chosen, rejected))

    def truncated(completion: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if max_length is None:
            return p, completion
        if truncation_mode == "keep_start":
            return p.clamp(max=max_length), ((p + completion).clamp(max=max_length) - p).clamp(min=0)
        if truncation_mode == "keep_end":
            kept_prompt = torch.where(p + completion <= max_length, p, (max_length - completion).clamp(min=0))
            return kept_prompt, completion.clamp(max=max_length)
        raise ValueError(f"Unsupported truncation_mode {truncation_mode!r}: expected 'keep_start' or 'keep_end'.")

    kept_prompt_c, chosen_kept = truncated(c)
    _, rejected_kept = truncated(r)
    chosen_scored = chosen_kept - ((kept_prompt_c == 0) & (chosen_kept > 0)).long()
    return CompletionLengths(chosen_kept, rejected_kept, chosen_scored)


def reference_normalised_margin(policy: PairLogProbs, reference: PairLogProbs) -> torch.Tensor:
    """`h_θ(z) = [log π_θ(y_w|x) - log π_ref(y_w|x)] - [log π_θ(y_l|x) - log π_ref(y_l|x)]`, in nats."""
    return (policy.chosen - reference.chosen) - (policy.rejected - reference.rejected)


def preference_loss(margin: torch.Tensor, beta: float, loss_type: str) -> torch.Tensor:
    """Per-pair DPO or SLiC loss from the reference-normalised margin `h` (docs/design.md §2), unreduced.

    - `"sigmoid"` (DPO): `-log σ(β·h)`
    - `"hinge"` (SLiC, reference-normalised as in RSO / TRL `loss_type="hinge"`): `max(0, 1 - β·h)`

    These are the exact expressions of TRL's `DPOTrainer` for the same `loss_type`. Every other loss of TRL (and lists
    of them) is [`PreferenceLoss`], which reads more than the margin.
    """
    if loss_type == "sigmoid":
        return -F.logsigmoid(beta * margin)
    if loss_type == "hinge":
        return torch.relu(1 - beta * margin)
    raise ValueError(
        f"Unsupported loss_type {loss_type!r} for `preference_loss` (sigmoid, hinge); use `PreferenceLoss` for "
        f"{SUPPORTED_LOSS_TYPES}."
    )


@dataclass(frozen=True)
class PreferenceLoss:
    r"""The trainer's per-pair loss `L(z; θ)`, exactly TRL 1.16's `DPOTrainer._compute_loss` for one pair (docs/design.md §2).

    With `a_w = log π_θ(y_w|x) - log π_ref(y_w|x)`, `a_l` likewise (nats), the f-divergence scores `s_w = f'(a_w)`,
    `s_l = f'(a_l)` (`reverse_kl`: `s = a`; `forward_kl`: `1 - e^{-a}`; `js_divergence`: `log 2 + log σ(a)`;
    `alpha_divergence`: `(e^{(α-1)a} - 1)/(α-1)`), `Δ = s_w - s_l` and `n_w`, `n_l` the completion token counts:

    - `sigmoid`: `-log σ(βΔ)`; `hinge`: `max(0, 1 - βΔ)`; `sigmoid_norm`: `-log σ(β(s_w/n_w - s_l/n_l))`;
    - `ipo`: `(s_w/n_w - s_l/n_l - 1/(2β))²`;
    - `robust`: `[-(1-ε) log σ(βΔ) + ε log σ(-βΔ)] / (1 - 2ε)`, `ε = label_smoothing`;
    - `exo_pair`: `σ(βΔ)(log σ(βΔ) - log(1-ε)) + σ(-βΔ)(log σ(-βΔ) - log ε)`;
    - `discopop`: `-log σ(βΔ)·(1 - σ(βΔ/τ)) + e^{-βΔ}·σ(βΔ/τ)`, `τ = discopop_tau`;
    - `nca_pair`: `-log σ(βa_w) - ½ log σ(-βa_w) - ½ log σ(-βa_l)`; `bco_pair`: `-log σ(βa_w) - log σ(-βa_l)`;
    - `sppo_hard`: `(a_w - 1/(2β))² + (a_l + 1/(2β))²`;
    - `apo_zero`: `1 - σ(βa_w) + σ(βa_l)`; `apo_down`: `σ(βa_w) + 1 - σ(β(a_w - a_l))`;
    - `sft`: `-log π_θ(y_w|x) / n_w'`, the pair's chosen NLL per scored token. TRL's term is one token mean over the
      whole batch (dpo_trainer.py:1495-1502); per pair it is each pair's own token mean, which averages to TRL's
      value when the chosen completions of a batch have equal lengths.

    With several `loss_types`, `L = Σ_k w_k L_k` (`loss_weights`, default all 1), so the batch mean of `L` is TRL's
    loss `Σ_k w_k mean(L_k)`. Units: nats for the log-sigmoid losses, unitless for the others.

    With `use_weighting` (WPO), every term is multiplied by the pair's weight under the model being scored,
    `L = w_θ(z) Σ_k w_k L_k`, `w_θ(z) = exp(policy.log_weight)` (dpo_trainer.py:1518-1526): the policy's argument
    must carry `log_weight` (`wpo_log_weights` of the same forward). The weight is a constant to autograd, as in TRL.
    With `ld_alpha`, the summed log-probs passed in are already LD-weighted (`completion_sums`); the loss is the same
    function of them, and `ipo`/`sigmoid_norm` still divide by the unweighted token counts, as TRL does.

    Args:
        beta (`float`): TRL's `beta`.
        loss_types (`tuple[str, ...]`): TRL's `loss_type` list, from `SUPPORTED_LOSS_TYPES`.
        loss_weights (`tuple[float, ...]`, *optional*): TRL's `loss_weights`; all 1 if `None`.
        label_smoothing (`float`): ε of `robust` and `exo_pair`.
        f_divergence_type (`str`), f_alpha_divergence_coef (`float`): TRL's f-divergence settings.
        discopop_tau (`float`): τ of `discopop`.
        use_weighting (`bool`): TRL's `use_weighting` (WPO).
    """

    beta: float
    loss_types: tuple[str, ...] = ("sigmoid",)
    loss_weights: tuple[float, ...] | None = None
    label_smoothing: float = 0.0
    f_divergence_type: str = "reverse_kl"
    f_alpha_divergence_coef: float = 0.5
    discopop_tau: float = 0.05
    use_weighting: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "loss_types", tuple(self.loss_types))
        if not self.loss_types:
            raise ValueError("`loss_type` must name at least one loss.")
        for loss_type in self.loss_types:
            if loss_type in UNSUPPORTED_LOSS_TYPES:
                raise ValueError(
                    f"`loss_type={loss_type!r}` cannot be scored per pair: {UNSUPPORTED_LOSS_TYPES[loss_type]}."
                )
            if loss_type not in SUPPORTED_LOSS_TYPES:
                raise ValueError(f"Unknown `loss_type` {loss_type!r}: expected one of {SUPPORTED_LOSS_TYPES}.")
        weights = self.loss_weights
        if weights is not None:
            weights = tuple(float(w) for w in weights)
            if len(weights) != len(self.loss_types):
                raise ValueError(
                    f"`loss_weights` {list(weights)} must have one weight per `loss_type` {list(self.loss_types)}."
                )
            object.__setattr__(self, "loss_weights", weights)
        if self.f_divergence_type not in F_DIVERGENCE_TYPES:
            raise ValueError(f"Unknown `f_divergence_type` {self.f_divergence_type!r}: expected {F_DIVERGENCE_TYPES}.")
        if self.f_divergence_type != "reverse_kl" and not set(self.loss_types) <= set(F_DIVERGENCE_LOSS_TYPES):
            raise ValueError(
                f"`f_divergence_type={self.f_divergence_type!r}` works only with {F_DIVERGENCE_LOSS_TYPES} (as in "
                f"TRL), got `loss_type={list(self.loss_types)}`."
            )
        if "exo_pair" in self.loss_types and not 0.0 < self.label_smoothing < 1.0:
            raise ValueError(f"`exo_pair` needs 0 < `label_smoothing` < 1 (as in TRL), got {self.label_smoothing}.")
        if "robust" in self.loss_types and self.label_smoothing == 0.5:
            raise ValueError("`robust` divides by `1 - 2·label_smoothing`: `label_smoothing=0.5` is undefined.")
        if self.use_weighting and "sft" in self.loss_types:
            # TRL 1.16 expands the batch's scalar SFT term to a per-pair view and scales it in place by the WPO
            # weights (dpo_trainer.py:1501, 1525), which PyTorch refuses: the trainer itself cannot train this loss.
            raise ValueError(
                "`use_weighting=True` with `loss_type` 'sft' cannot be trained by TRL 1.16's DPOTrainer (it multiplies "
                "the expanded SFT term in place by the WPO weights, which PyTorch refuses), so it has no loss to score."
            )

    @classmethod
    def from_args(cls, args: Any) -> PreferenceLoss:
        """The loss a `DPOConfig` (or anything with its fields) trains with."""
        return cls(
            beta=float(args.beta),
            loss_types=tuple(args.loss_type),
            loss_weights=None if args.loss_weights is None else tuple(args.loss_weights),
            label_smoothing=float(args.label_smoothing),
            f_divergence_type=str(getattr(args.f_divergence_type, "value", args.f_divergence_type)),
            f_alpha_divergence_coef=float(args.f_alpha_divergence_coef),
            discopop_tau=float(args.discopop_tau),
            use_weighting=bool(getattr(args, "use_weighting", False)),
        )

    @property
    def weights(self) -> tuple[float, ...]:
        return self.loss_weights if self.loss_weights is not None else (1.0,) * len(self.loss_types)

    @property
    def needs_lengths(self) -> bool:
        """Whether the loss reads completion lengths (`ipo`, `sigmoid_norm`, `sft`)."""
        return bool(set(self.loss_types) & set(LENGTH_LOSS_TYPES))

    @property
    def reads_label_smoothing(self) -> bool:
        return bool(set(self.loss_types) & set(LABEL_SMOOTHING_LOSS_TYPES))

    def _f_scores(self, log_ratio: torch.Tensor) -> torch.Tensor:
        """`f'(π_θ/π_ref)` of the f-divergence, from the log-ratio (dpo_trainer.py:1353-1381)."""
        kind = self.f_divergence_type
        if kind == "reverse_kl":
            return log_ratio
        if kind == "forward_kl":
            return 1 - torch.exp(-log_ratio)
        if kind == "js_divergence":
            return math.log(2) + F.logsigmoid(log_ratio)
        alpha = self.f_alpha_divergence_coef
        if abs(alpha - 1.0) < 1e-6:
            return log_ratio
        t = (alpha - 1.0) * log_ratio
        clamp_max = 11.0 if t.dtype == torch.float16 else 80.0
        wide = t.float() if t.dtype in (torch.float16, torch.bfloat16) else t
        return (torch.exp(torch.clamp(wide, max=clamp_max)) - 1.0).to(t.dtype) * (1.0 / (alpha - 1.0))

    def __call__(
        self, policy: PairLogProbs, reference: PairLogProbs, lengths: CompletionLengths | None = None
    ) -> torch.Tensor:
        """`L(z; θ)` per pair, unreduced, shape `(num_pairs,)`; `lengths` is required by `ipo`, `sigmoid_norm`, `sft`,
        `policy.log_weight` by `use_weighting`."""
        if self.needs_lengths and lengths is None:
            raise ValueError(f"`loss_type={list(self.loss_types)}` needs the completion lengths of the pairs.")
        if self.use_weighting and policy.log_weight is None:
            raise ValueError(
                "`use_weighting=True` (WPO) weights each pair's loss by the scored model's own per-pair weight, but "
                "these log-probs carry no `log_weight`: score them with `use_weighting` on."
            )
        beta = self.beta
        chosen_ratio = policy.chosen - reference.chosen
        rejected_ratio = policy.rejected - reference.rejected
        chosen_score, rejected_score = self._f_scores(chosen_ratio), self._f_scores(rejected_ratio)
        delta = chosen_score - rejected_score
        device = delta.device
        pair_weight = None
        if self.use_weighting:
            # TRL's `chosen_weights * rejected_weights`, computed without gradient (a constant to autograd)
            pair_weight = torch.exp(policy.log_weight.detach().to(device, delta.dtype))
        total = torch.zeros_like(delta)
        for loss_type, weight in zip(self.loss_types, self.weights, strict=True):
            if loss_type in ("ipo", "sigmoid_norm"):
                chosen_tokens = lengths.chosen.to(device, delta.dtype).clamp(min=1.0)
                rejected_tokens = lengths.rejected.to(device, delta.dtype).clamp(min=1.0)
                per_token_delta = chosen_score / chosen_tokens - rejected_score / rejected_tokens
            if loss_type == "sigmoid":
                loss = -F.logsigmoid(beta * delta)
            elif loss_type == "hinge":
                loss = torch.relu(1 - beta * delta)
            elif loss_type == "ipo":
                loss = (per_token_delta - 1 / (2 * beta)) ** 2
            elif loss_type == "exo_pair":
                epsilon = torch.tensor(self.label_smoothing, device=device, dtype=delta.dtype)
                chosen_term = torch.sigmoid(beta * delta) * (F.logsigmoid(beta * delta) - torch.log1p(-epsilon))
                rejected_term = torch.sigmoid(-beta * delta) * (F.logsigmoid(-beta * delta) - torch.log(epsilon))
                loss = chosen_term + rejected_term
            elif loss_type == "nca_pair":
                loss = (
                    -F.logsigmoid(beta * chosen_ratio)
                    - 0.5 * F.logsigmoid(-beta * chosen_ratio)
                    - 0.5 * F.logsigmoid(-beta * rejected_ratio)
                )
            elif loss_type == "robust":
                eps = self.label_smoothing
                loss = (-(1 - eps) * F.logsigmoid(beta * delta) + eps * F.logsigmoid(-beta * delta)) / (1 - 2 * eps)
            elif loss_type == "bco_pair":
                loss = -F.logsigmoid(beta * chosen_ratio) - F.logsigmoid(-beta * rejected_ratio)
            elif loss_type == "sppo_hard":
                loss = (chosen_ratio - 0.5 / beta) ** 2 + (rejected_ratio + 0.5 / beta) ** 2
            elif loss_type == "apo_zero":
                loss = 1 - torch.sigmoid(beta * chosen_ratio) + torch.sigmoid(beta * rejected_ratio)
            elif loss_type == "apo_down":
                loss = torch.sigmoid(beta * chosen_ratio) + 1 - torch.sigmoid(beta * (chosen_ratio - rejected_ratio))
            elif loss_type == "discopop":
                logits = beta * delta
                modulation = torch.sigmoid(logits / self.discopop_tau)
                loss = -F.logsigmoid(logits) * (1 - modulation) + torch.exp(-logits) * modulation
            elif loss_type == "sft":
                loss = -policy.chosen / lengths.chosen_scored.to(device, delta.dtype).clamp(min=1.0)
            else:  # sigmoid_norm
                loss = -F.logsigmoid(beta * per_token_delta)
            if pair_weight is not None:
                loss = loss * pair_weight  # each term, as TRL weights each `per_sequence_loss`
            total = total + weight * loss
        return total

    def log_prob_slopes(
        self, policy: PairLogProbs, reference: PairLogProbs, lengths: CompletionLengths | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`(∂L/∂log π_θ(y_w|x), ∂L/∂log π_θ(y_l|x))` per pair, by autograd through `__call__`, loss units per nat.

        Every term of `L` depends on the pair's own log-probs only, so the gradient of `Σ_z L(z)` with respect to
        each pair's log-probs is that pair's partial derivative. At a kink (`hinge` at `βΔ = 1`) it is autograd's
        choice, 0, as in training.
        """
        with torch.enable_grad():
            chosen = policy.chosen.detach().clone().requires_grad_(True)
            rejected = policy.rejected.detach().clone().requires_grad_(True)
            # WPO's weight stays a constant (TRL computes it under `no_grad`): ∂(w·L)/∂log π = w·∂L/∂log π
            losses = self(PairLogProbs(chosen, rejected, policy.log_weight), reference, lengths)
            d_chosen, d_rejected = torch.autograd.grad(losses.sum(), (chosen, rejected), allow_unused=True)
        zeros = torch.zeros_like(policy.chosen)
        return (zeros if d_chosen is None else d_chosen), (zeros if d_rejected is None else d_rejected)

    def loss_difference(
        self,
        policy: PairLogProbs,
        auxiliary: PairLogProbs,
        reference: PairLogProbs,
        lengths: CompletionLengths | None = None,
    ) -> torch.Tensor:
        """LossDiff `L(z; θ_t) - L(z; θ_aux)` with this loss (docs/design.md §3.2), same reference, loss units."""
        return self(policy, reference, lengths) - self(auxiliary, reference, lengths)


def preference_loss_slope(margin: torch.Tensor, beta: float, loss_type: str) -> torch.Tensor:
    """`dL/dh`, the derivative of the per-pair loss with respect to the margin `h` (docs/design.md §2), unreduced.

    - `"sigmoid"` (DPO): `-β · σ(-β·h)`, so `∇θ L_DPO(z) = -β σ(-β h) [∇ log π(y_w|x) - ∇ log π(y_l|x)]`.
    - `"hinge"` (SLiC): `-β · 1[β·h < 1]` (0 at the kink `β·h = 1`, as autograd's `relu` gives).
    """
    if loss_type == "sigmoid":
        return -beta * torch.sigmoid(-beta * margin)
    if loss_type == "hinge":
        return -beta * (beta * margin < 1).to(margin.dtype)
    raise ValueError(f"Unsupported loss_type {loss_type!r}: selection supports {SUPPORTED_LOSS_TYPES}.")


def implicit_reward_margin(policy: PairLogProbs, reference: PairLogProbs, beta: float) -> torch.Tensor:
    """IRM, the implicit reward margin: `IRM(z) = β · h_θt(z)`, in units of β-scaled nats.

    Its batch mean is what `DPOTrainer` logs as `rewards/margins`.
    """
    return beta * reference_normalised_margin(policy, reference)


def loss_difference(
    policy: PairLogProbs,
    auxiliary: PairLogProbs,
    reference: PairLogProbs,
    beta: float | PreferenceLoss,
    loss_type: str | None = None,
    lengths: CompletionLengths | None = None,
) -> torch.Tensor:
    """LossDiff: `LD(z) = L(z; θ_t) - L(z; θ_aux)`, in loss units (nats for DPO).

    Larger means that moving from θ_t toward the validation-aligned θ_aux lowers this pair's loss: the pair agrees
    with the validation direction. Both losses use the same reference and the trainer's own loss: a
    [`PreferenceLoss`] as `beta` (then `loss_type` is unused), or `beta` and one `loss_type` name.
    """
    loss = beta if isinstance(beta, PreferenceLoss) else PreferenceLoss(beta=float(beta), loss_types=(loss_type,))
    return loss.loss_difference(policy, auxiliary, reference, lengths)


def reward_gap(policy: PairLogProbs, reference: PairLogProbs, beta: float) -> torch.Tensor:
    """Implicit reward gap (arXiv 2508.04149): `r(x, y_w) - r(x, y_l)` with `r = β log(π_θt/π_ref)`, i.e. IRM.

    The difficulty paper keeps the pairs with the *smallest* gap (the hardest for the current policy); the same
    number as `implicit_reward_margin`, under its own name so score files say which rule read it.
    """
    return implicit_reward_margin(policy, reference, beta)


def davir(policy: PairLogProbs, reference: PairLogProbs) -> torch.Tensor:
    """DavIR normalised learnability of the chosen response: `(ℓ_ref(y_w) - ℓ_θt(y_w)) / ℓ_ref(y_w)`, unitless.

    `ℓ` is the mean per-token NLL of the chosen completion, `ℓ = -log π(y_w|x) / |y_w|`. Both models score the same
    tokens, so the token count cancels: the score is `1 - log π_θt(y_w|x) / log π_ref(y_w|x)` from summed log-probs,
    and it is length-normalised in that it is a relative loss reduction (a long answer with a large absolute drop in
    NLL scores no higher than a short one with the same relative drop). 1 means θ_t fits y_w perfectly, 0 no
    progress over π_ref, negative a regression. A chosen completion π_ref already fits perfectly (`log π_ref = 0`)
    gives a non-finite score, which no rule keeps.
    """
    with torch.no_grad():
        return 1.0 - policy.chosen.double() / reference.chosen.double()


def influence_from_directional_derivatives(
    policy: PairLogProbs,
    reference: PairLogProbs,
    chosen_derivative: torch.Tensor,
    rejected_derivative: torch.Tensor,
    beta: float | PreferenceLoss,
    loss_type: str | None = None,
    lengths: CompletionLengths | None = None,
) -> torch.Tensor:
    """`IF(z) = ⟨g, ∇θ L(z)⟩ = ∂L/∂log π(y_w|x) · D_g log π(y_w|x) + ∂L/∂log π(y_l|x) · D_g log π(y_l|x)`
    (docs/design.md §3.5), loss units.

    `chosen_derivative`/`rejected_derivative` are the directional derivatives `D_g log π(y|x) = ⟨∇θ log π(y|x), g⟩` of
    the summed completion log-probs along `g` (the validation-loss gradient for the influence score). For a loss of
    the margin alone (`sigmoid`, `hinge`) the partials are `±dL/dh`, so this is `(dL/dh)·(D_g log π_w - D_g log π_l)`.
    `beta` is a [`PreferenceLoss`], or `beta` with one margin `loss_type` (`sigmoid`, `hinge`).
    """
    if not isinstance(beta, PreferenceLoss):
        slope = preference_loss_slope(reference_normalised_margin(policy, reference), beta, loss_type)
        return slope * (chosen_derivative - rejected_derivative)
    d_chosen, d_rejected = beta.log_prob_slopes(policy, reference, lengths)
    return d_chosen * chosen_derivative + d_rejected * rejected_derivative
