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
        # queries only for the tokens asked for (the decision path asks for one): same weights as one qkv
        q = F.linear(x[:, n - queries:], self.qkv.weight[:c], self.qkv.bias[:c])
        k, v = F.linear(x, self.qkv.weight[c:], self.qkv.bias[c:]).split(c, dim=2)
        q = q.reshape(b, queries, self.n_heads, c // self.n_heads).transpose(1, 2)
        k = k.view(b, n, self.n_heads, c // self.n_heads).transpose(1, 2)
        v = v.view(b, n, self.n_heads, c // self.n_heads).transpose(1, 2)
        # explicit attention: with ~10 keys per query the fused CPU kernel's per-head setup dominates
        # (measured 0.8 ms vs 0.1 ms per call for 128 users); same result as scaled_dot_product_attention
        scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(c // self.n_heads))
        scores = scores.masked_fill(~attn_mask, float("-inf"))
        weights = torch.exp(scores - scores.amax(dim=-1, keepdim=True))  # softmax: 5x faster than the
        weights = weights / weights.sum(dim=-1, keepdim=True)  # library's on a last dim of ~10 (CPU)
        y = F.dropout(weights, self.dropout, self.training) @ v
        return self.proj(y.transpose(1, 2).reshape(b, queries, c))


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
        g = (rtg / self.rtg_scale).unsqueeze(-1)
        c = (ctg / self.ctg_scale).unsqueeze(-1)
        t = torch.clamp(timesteps, 0, self.max_timestep - 1)
        common = self.embed_time(t)
        if self.use_lambda:
            common = common + self.embed_lambda(lam.view(b, 1, 1).expand(b, n, 1))

        if self.step_layout:
            prev_real = torch.zeros_like(mask)
            prev_real[:, 1:] = mask[:, :-1]
            prev_action = torch.full_like(actions, self.num_actions)
            prev_action[:, 1:] = actions[:, :-1]
            prev_action = torch.where(prev_real, prev_action, torch.full_like(prev_action, self.num_actions))
            prev_outcome = torch.zeros(b, n, 2, dtype=g.dtype, device=g.device)
            prev_outcome[:, 1:, 0] = g[:, :-1, 0] - g[:, 1:, 0]
            prev_outcome[:, 1:, 1] = c[:, :-1, 0] - c[:, 1:, 0]
            prev_outcome = prev_outcome * prev_real.unsqueeze(-1).to(g.dtype)
            x = (self.embed_state(s) + self.embed_rtg(g) + self.embed_ctg(c) + self.embed_action(prev_action)
                 + self.embed_outcome(prev_outcome) + common)
            if self.use_history:
                x = x + self.embed_history(self._history(actions, g[..., 0], c[..., 0], mask))
            return self.drop(self.ln_in(x)), mask
        tokens = torch.stack(
            [self.embed_rtg(g), self.embed_ctg(c), self.embed_state(s), self.embed_action(actions)], dim=2
        ) + common.unsqueeze(2)
        # the last step's action token is the decision being made: drop it, so the state token is last
        x = tokens.reshape(b, 4 * n, -1)[:, :-1]
        return self.drop(self.ln_in(x)), mask.repeat_interleave(4, dim=1)[:, :-1]

    def _history(self, actions: torch.Tensor, g: torch.Tensor, c: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """[B, L, D*(K+3)]: for each step, decayed sums over the steps before it of (action one-hot,
        reward, cost, purchase), one set per decay rate. Step j's reward is g_j - g_{j+1}."""
        b, n = actions.shape
        real = mask.to(g.dtype)
        reward = torch.zeros_like(g)
        cost = torch.zeros_like(c)
        reward[:, :-1] = (g[:, :-1] - g[:, 1:]) * real[:, :-1] * real[:, 1:]
        cost[:, :-1] = (c[:, :-1] - c[:, 1:]) * real[:, :-1] * real[:, 1:]
        onehot = F.one_hot(actions, self.num_actions).to(g.dtype) * real.unsqueeze(-1)
        onehot[:, -1] = 0.0  # the last step's action is the decision being made
        events = torch.cat([onehot, reward.unsqueeze(-1), cost.unsqueeze(-1), (reward > 0).to(g.dtype).unsqueeze(-1)],
                           dim=-1)
        idx = torch.arange(n, device=g.device)
        lag = (idx.view(-1, 1) - idx.view(1, -1) - 1).to(g.dtype)  # i - j - 1 >= 0 for strictly past steps
        weights = torch.where(lag >= 0, self.history_decay.view(-1, 1, 1) ** lag.clamp(min=0.0),
                              torch.zeros_like(lag))  # [D, L, L]
        summary = torch.einsum("dij,bjf->bidf", weights, events)
        return summary.reshape(b, n, -1)

    @staticmethod
    def _attention_mask(token_mask: torch.Tensor, queries: int) -> torch.Tensor:
        """[B, 1, queries, M]: causal over real tokens; every query sees itself (no NaN on padding)."""
        m = token_mask.shape[1]
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
        attn_mask = self._attention_mask(token_mask, m)
        for block in self.blocks:
            x = block(x, attn_mask, m)
        if decision_only:
            return self.ln_out(self.last_block(x, self._attention_mask(token_mask, 1), 1))
        return self.ln_out(self.last_block(x, attn_mask, m))

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
