"""The Constrained-Optimization Decision Transformer (SACO, Algorithm 1), in one file.

Inputs per user (raw units; normalisation is inside the module so an exported copy needs nothing else):
    states [B, L, d], actions [B, L], rtg [B, L], ctg [B, L], timesteps [B, L], lam [B], mask [B, L]
Steps are right-aligned: padding on the left, the last position is the decision being made.

Two token layouts:
- "dt4" (the paper): four tokens per step (RTG, CTG, s, a), each embedded + Embed(t) + Embed(lambda);
  the action is read at the state token, so it sees RTG/CTG/s of its own step and everything before.
- "step" (default): one token per step carrying s_t, RTG_t, CTG_t and the previous step's action, reward
  and cost (the reward/cost are recovered from consecutive to-go values). 4x fewer tokens, 16x less
  attention work, same information; this is what keeps 128 users within a few ms on a CPU.

Two kinds of output, read at the decision token:
- action logits (the paper's Eq. 7 cross-entropy; objectives "dt-literal" / "dt-lagrangian");
- per-action value heads (objective "value", the product default): expected revenue and cost now and
  later (until the end of the trajectory), so the policy picks argmax_a  R(a) - lambda * C(a). Lambda then
  prices cost exactly as in the dual (6) and spend is monotone in lambda by construction.
"""

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

TOKEN_LAYOUTS = ("step", "dt4")


@dataclass
class ModelConfig:
    feature_dim: int
    num_actions: int
    context_length: int = 10
    max_timestep: int = 64
    d_model: int = 64
    n_layers: int = 1
    n_heads: int = 4
    dropout: float = 0.1
    token_layout: str = "step"
    objective: str = "value"
    future_weight: float = 0.0  # weight of the "later" value heads in the score (0 = revenue and cost now)
    # Exponential moving averages of past actions / rewards / costs / purchases fed to each step token
    # ("step" layout): carry-over state (fatigue, habit, reference) in a form one layer can read.
    history_decays: tuple[float, ...] = (0.5, 0.8)

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_heads = cfg.n_heads
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.dropout = cfg.dropout

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor, queries: int) -> torch.Tensor:
        """Attention outputs for the last `queries` tokens of `x` (all tokens when queries == n)."""
        b, n, c = x.shape
        h, dh = self.n_heads, c // self.n_heads
        w_q, w_k, w_v = self.qkv.weight.split(c)
        b_q, _, b_v = self.qkv.bias.split(c)  # the key bias moves no attention weight (see _one_query)
        # queries only for the tokens asked for (the decision path asks for one)
        q = F.linear(x[:, n - queries:], w_q, b_q).view(b, queries, h, dh).transpose(1, 2)
        if queries == 1 and not self.training:
            return self.proj(self._one_query(x, q[:, :, 0], attn_mask[:, :, 0], w_k, w_v, b_v)).unsqueeze(1)
        k, v = F.linear(x, self.qkv.weight[c:], self.qkv.bias[c:]).split(c, dim=2)
        k = k.view(b, n, h, dh).transpose(1, 2)
        v = v.view(b, n, h, dh).transpose(1, 2)
        # explicit attention: with ~10 keys per query the fused CPU kernel's per-head setup dominates
        # (measured 0.8 ms vs 0.1 ms per call for 128 users); same result as scaled_dot_product_attention
        scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(dh))
        scores = scores.masked_fill(~attn_mask, float("-inf"))
        weights = torch.exp(scores - scores.amax(dim=-1, keepdim=True))  # softmax: 5x faster than the
        weights = weights / weights.sum(dim=-1, keepdim=True)  # library's on a last dim of ~10 (CPU)
        y = F.dropout(weights, self.dropout, self.training) @ v
        return self.proj(y.transpose(1, 2).reshape(b, queries, c))

    def _one_query(self, x: torch.Tensor, q: torch.Tensor, attn_mask: torch.Tensor, w_k: torch.Tensor,
                   w_v: torch.Tensor, b_v: torch.Tensor) -> torch.Tensor:
        """One query per row (q [B, h, dh]) without projecting the n keys and values: the projections
        move to the query side, so all per-token work is two [B, h, c] x [B, c, n] products.
        q.(W_k x_j + b_k) = (W_k^T q).x_j + q.b_k, and q.b_k is the same for every key (the softmax drops it);
        sum_j w_j (W_v x_j + b_v) = W_v (sum_j w_j x_j) + b_v, as the weights sum to 1."""
        b, c = x.shape[0], x.shape[2]
        h, dh = q.shape[1], q.shape[2]
        q_in = torch.bmm(q.transpose(0, 1), w_k.view(h, dh, c)).transpose(0, 1)  # [B, h, c]
        scores = torch.bmm(q_in, x.transpose(1, 2)) * (1.0 / math.sqrt(dh))  # [B, h, n]
        scores = scores.masked_fill(~attn_mask, float("-inf"))
        weights = torch.exp(scores - scores.amax(dim=-1, keepdim=True))
        weights = weights / weights.sum(dim=-1, keepdim=True)
        mixed = torch.bmm(weights, x)  # [B, h, c]: the attention-weighted input of each head
        y = torch.bmm(mixed.transpose(0, 1), w_v.view(h, dh, c).transpose(1, 2))  # [h, B, dh]
        return y.transpose(0, 1).reshape(b, c) + b_v


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.d_model)
        self.attn = CausalSelfAttention(cfg)
        self.ln2 = nn.LayerNorm(cfg.d_model)
        self.mlp = nn.Sequential(
            nn.Linear(cfg.d_model, 4 * cfg.d_model), nn.GELU(), nn.Linear(4 * cfg.d_model, cfg.d_model),
            nn.Dropout(cfg.dropout),
        )

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor, queries: int) -> torch.Tensor:
        """The block's output for the last `queries` tokens (the decision path needs only one)."""
        x = x[:, x.shape[1] - queries:] + self.attn(self.ln1(x), attn_mask, queries)
        return x + self.mlp(self.ln2(x))


class SacoTransformer(nn.Module):
    state_mean: torch.Tensor
    state_std: torch.Tensor
    rtg_scale: torch.Tensor
    ctg_scale: torch.Tensor
    history_decay: torch.Tensor
    history_weights: torch.Tensor

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        if cfg.token_layout not in TOKEN_LAYOUTS:
            raise ValueError(f"token_layout must be one of {TOKEN_LAYOUTS}")
        if cfg.d_model % cfg.n_heads:
            raise ValueError("d_model must be divisible by n_heads")
        self.cfg = cfg
        self.num_actions = cfg.num_actions
        self.max_timestep = cfg.max_timestep
        self.step_layout = cfg.token_layout == "step"
        self.use_lambda = cfg.objective != "value"
        self.future_weight = cfg.future_weight
        self.value_objective = cfg.objective == "value"
        h, k = cfg.d_model, cfg.num_actions
        # normalisation (set from training data; saved with the module)
        self.register_buffer("state_mean", torch.zeros(cfg.feature_dim))
        self.register_buffer("state_std", torch.ones(cfg.feature_dim))
        self.register_buffer("rtg_scale", torch.ones(()))
        self.register_buffer("ctg_scale", torch.ones(()))

        self.embed_state = nn.Linear(cfg.feature_dim, h)
        self.embed_action = nn.Embedding(k + 1, h)  # index k = "no previous action" (first step)
        self.embed_rtg = nn.Linear(1, h)
        self.embed_ctg = nn.Linear(1, h)
        self.embed_outcome = nn.Linear(2, h)  # previous reward and cost (step layout)
        self.register_buffer("history_decay", torch.tensor(list(cfg.history_decays) or [0.0], dtype=torch.float32))
        # derived from history_decay (not saved in checkpoints; kept by the TorchScript export)
        self.register_buffer("history_weights", self._history_weights(self.history_decay, cfg.context_length),
                             persistent=False)
        self.use_history = len(cfg.history_decays) > 0
        self.embed_history = nn.Linear(max(len(cfg.history_decays), 1) * (k + 3), h)
        self.embed_time = nn.Embedding(cfg.max_timestep, h)
        self.embed_lambda = nn.Linear(1, h)
        self.ln_in = nn.LayerNorm(h)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList([Block(cfg) for _ in range(cfg.n_layers - 1)])
        self.last_block = Block(cfg)
        self.ln_out = nn.LayerNorm(h)
        self.action_head = nn.Linear(h, k)
        self.value_head = nn.Linear(h, 4 * k)  # revenue now, cost now, revenue later, cost later
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def set_normalisation(self, state_mean: torch.Tensor, state_std: torch.Tensor, rtg_scale: float,
                          ctg_scale: float) -> None:
        self.state_mean.copy_(state_mean)
        self.state_std.copy_(torch.clamp(state_std, min=1e-6))
        self.rtg_scale.fill_(max(rtg_scale, 1e-6))
        self.ctg_scale.fill_(max(ctg_scale, 1e-6))

    def _tokens(
        self,
        states: torch.Tensor,
        actions: torch.Tensor,
        rtg: torch.Tensor,
        ctg: torch.Tensor,
        timesteps: torch.Tensor,
        lam: torch.Tensor,
        mask: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Embedded tokens [B, M, h] and which of them are real [B, M]."""
        b, n = actions.shape
        s = (states - self.state_mean) / self.state_std
        g = (rtg / self.rtg_scale).unsqueeze(-1)  # [B, L, 1]
        c = (ctg / self.ctg_scale).unsqueeze(-1)
        t = torch.clamp(timesteps, 0, self.max_timestep - 1)
        common = self.embed_time(t)
        if self.use_lambda:
            common = common + self.embed_lambda(lam.view(b, 1, 1).expand(b, n, 1))

        if self.step_layout:
            # each step's token sees the previous step's action, reward and cost ("none" before the first)
            prev_real = torch.cat([torch.zeros_like(mask[:, :1]), mask[:, :-1]], dim=1)
            prev_action = torch.cat([torch.full_like(actions[:, :1], self.num_actions), actions[:, :-1]], dim=1)
            prev_action = torch.where(prev_real, prev_action, torch.full_like(prev_action, self.num_actions))
            # step j's reward and cost are the drops of the to-go values to step j+1 (0 where j+1 is unknown)
            to_go = torch.cat([g, c], dim=2)  # [B, L, 2]
            real = mask.to(g.dtype).unsqueeze(-1)
            outcomes = torch.cat([(to_go[:, :-1] - to_go[:, 1:]) * real[:, :-1] * real[:, 1:],
                                  torch.zeros_like(to_go[:, :1])], dim=1)
            prev_outcome = torch.cat([torch.zeros_like(to_go[:, :1]), outcomes[:, :-1]], dim=1)
            # the state, to-go, outcome and history embeddings are linear in their inputs: one matmul over
            # the concatenated inputs with the concatenated weights is their sum (same parameters)
            inputs = [s, to_go, prev_outcome]
            weights = [self.embed_state.weight, self.embed_rtg.weight, self.embed_ctg.weight, self.embed_outcome.weight]
            bias = self.embed_state.bias + self.embed_rtg.bias + self.embed_ctg.bias + self.embed_outcome.bias
            if self.use_history:
                inputs.append(self._history(actions, outcomes, real))
                weights.append(self.embed_history.weight)
                bias = bias + self.embed_history.bias
            x = (F.linear(torch.cat(inputs, dim=2), torch.cat(weights, dim=1), bias) + self.embed_action(prev_action)
                 + common)
            return self.drop(self.ln_in(x)), mask
        tokens = torch.stack(
            [self.embed_rtg(g), self.embed_ctg(c), self.embed_state(s), self.embed_action(actions)], dim=2
        ) + common.unsqueeze(2)
        # the last step's action token is the decision being made: drop it, so the state token is last
        x = tokens.reshape(b, 4 * n, -1)[:, :-1]
        return self.drop(self.ln_in(x)), mask.repeat_interleave(4, dim=1)[:, :-1]

    def _history(self, actions: torch.Tensor, outcomes: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
        """[B, L, D*(K+3)]: for each step, decayed sums over the steps before it of (action one-hot,
        reward, cost, purchase), one set per decay rate. `outcomes` [B, L, 2]: each step's reward and cost."""
        b, n = actions.shape
        onehot = F.one_hot(actions, self.num_actions).to(outcomes.dtype) * real
        onehot[:, -1] = 0.0  # the last step's action is the decision being made
        events = torch.cat([onehot, outcomes, (outcomes[:, :, :1] > 0).to(outcomes.dtype)], dim=2)
        weights = self.history_weights
        if n <= weights.shape[0]:  # the bottom-right block: weights depend on i - j only
            weights = weights[weights.shape[0] - n:, :, weights.shape[0] - n:]
        else:
            weights = self._history_weights(self.history_decay, n)
        # rows (i, d) of [L*D, L] times events [B, L, F]: [B, L*D, F], already in the (i, d, f) order
        return torch.matmul(weights.reshape(n * weights.shape[1], n), events).reshape(b, n, -1)

    @staticmethod
    def _history_weights(decays: torch.Tensor, n: int) -> torch.Tensor:
        """[L, D, L]: decay_d ** (i - j - 1) for the steps j before i, else 0."""
        idx = torch.arange(n, device=decays.device)
        lag = (idx.view(-1, 1, 1) - idx.view(1, 1, -1) - 1).to(decays.dtype)
        return torch.where(lag >= 0, decays.view(1, -1, 1) ** lag.clamp(min=0.0), torch.zeros_like(lag))

    @staticmethod
    def _attention_mask(token_mask: torch.Tensor, queries: int) -> torch.Tensor:
        """[B, 1, queries, M]: causal over real tokens; every query sees itself (no NaN on padding)."""
        b, m = token_mask.shape
        if queries == 1:  # the decision token: every real token, and itself
            return torch.cat([token_mask[:, :-1], torch.ones_like(token_mask[:, -1:])], dim=1).view(b, 1, 1, m)
        rows = torch.arange(m - queries, m, device=token_mask.device).unsqueeze(1)
        cols = torch.arange(m, device=token_mask.device).unsqueeze(0)
        allowed = (cols <= rows).unsqueeze(0) & token_mask.unsqueeze(1)
        return (allowed | (cols == rows).unsqueeze(0)).unsqueeze(1)

    def _hidden(
        self,
        states: torch.Tensor,
        actions: torch.Tensor,
        rtg: torch.Tensor,
        ctg: torch.Tensor,
        timesteps: torch.Tensor,
        lam: torch.Tensor,
        mask: torch.Tensor,
        decision_only: bool,
    ) -> torch.Tensor:
        """Final hidden states [B, M, h] of every token, or [B, 1, h] of the decision token only (then the
        last block computes that one query: every earlier block must still see all tokens)."""
        x, token_mask = self._tokens(states, actions, rtg, ctg, timesteps, lam, mask)
        m = x.shape[1]
        if len(self.blocks) > 0 or not decision_only:  # (a 1-layer decision path needs no full mask)
            attn_mask = self._attention_mask(token_mask, m)
            for block in self.blocks:
                x = block(x, attn_mask, m)
            if not decision_only:
                return self.ln_out(self.last_block(x, attn_mask, m))
        return self.ln_out(self.last_block(x, self._attention_mask(token_mask, 1), 1))

    def forward(
        self,
        states: torch.Tensor,
        actions: torch.Tensor,
        rtg: torch.Tensor,
        ctg: torch.Tensor,
        timesteps: torch.Tensor,
        lam: torch.Tensor,
        mask: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Training: action logits [B, L, K] and value heads [B, L, 4, K] (scaled units) at every step."""
        b, n = actions.shape
        x = self._hidden(states, actions, rtg, ctg, timesteps, lam, mask, False)
        if not self.step_layout:
            x = torch.cat([x, x[:, -1:]], dim=1).reshape(b, n, 4, -1)[:, :, 2]  # read at the state tokens
        return self.action_head(x), self.value_head(x).view(b, n, 4, self.num_actions)

    def decide(
        self,
        states: torch.Tensor,
        actions: torch.Tensor,
        rtg: torch.Tensor,
        ctg: torch.Tensor,
        timesteps: torch.Tensor,
        lam: torch.Tensor,
        mask: torch.Tensor,
    ) -> torch.Tensor:
        """Serving: decision scores [B, K] for the last step. The last block runs for that token only."""
        b = actions.shape[0]
        x = self._hidden(states, actions, rtg, ctg, timesteps, lam, mask, True)[:, 0]
        if self.value_objective:
            v = self.value_head(x).view(b, 4, self.num_actions)
            revenue = (v[:, 0] + self.future_weight * v[:, 2]) * self.rtg_scale
            cost = (v[:, 1] + self.future_weight * v[:, 3]) * self.ctg_scale
            return revenue - lam.view(-1, 1) * cost
        return self.action_head(x)


class PolicyModule(nn.Module):
    """What is exported: raw inputs -> decision scores [B, K] for the last step (argmax = the policy)."""

    def __init__(self, model: SacoTransformer) -> None:
        super().__init__()
        self.model = model

    def forward(
        self,
        states: torch.Tensor,
        actions: torch.Tensor,
        rtg: torch.Tensor,
        ctg: torch.Tensor,
        timesteps: torch.Tensor,
        lam: torch.Tensor,
        mask: torch.Tensor,
    ) -> torch.Tensor:
        return self.model.decide(states, actions, rtg, ctg, timesteps, lam, mask)


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def flops_per_decision(cfg: ModelConfig) -> float:
    """Rough multiply-adds for one user's decision at full context (for size/quality reports)."""
    tokens = cfg.context_length * (1 if cfg.token_layout == "step" else 4)
    per_token = cfg.n_layers * 12 * cfg.d_model**2
    attention = cfg.n_layers * 2 * tokens * tokens * cfg.d_model
    return float(tokens * per_token + attention)
