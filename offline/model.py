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

Two ways to name an action:
- by index (the paper's way, `action_features` 0): an action is one of K classes, embedded and scored by its
  own row of each head, so a new coupon is a new class and needs a new model;
- by features (`action_features` F > 0): an action is its row of an action table [T, F]
  (contract/catalog.py `action_descriptors`: what a coupon or bundle gives), both where a step's action is
  read (the previous-action input and the history) and where actions are scored (a two-tower value head:
  the decision token's vector times an MLP of the action's row). Another table (a catalog with a coupon
  added) is scored by the same weights, without retraining (`PolicyModule.catalog_terms`). The model's
  table is the training catalog's; its first num_actions rows are no coupon and each coupon alone, the
  actions `decide` scores; step layout and value objective only.

Two kinds of output, read at the decision token:
- action logits (the paper's Eq. 7 cross-entropy; objectives "dt-literal" / "dt-lagrangian");
- per-action value heads (objective "value", the product default): expected revenue and cost now and
  later (until the end of the trajectory), so the policy picks argmax_a  R(a) - lambda * C(a). Lambda then
  prices cost exactly as in the dual (6) and spend is monotone in lambda by construction.
"""

import copy
import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from model_store import ScoringModule

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
    action_features: int = 0  # F > 0: actions are rows of an action table [table_rows, F] (module docstring)
    # by features: the table's rows, at least num_actions (0: num_actions). Rows 0..num_actions-1 are no coupon
    # and each coupon alone (what `forward` and `score_terms` of the export score), the rest other actions (the
    # bundles of several coupons the training logs hold; contract/catalog.py `ActionRows`)
    table_rows: int = 0

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_heads = cfg.n_heads
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.dropout = cfg.dropout

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        h, dh = self.n_heads, c // self.n_heads
        q = F.linear(x, self.qkv.weight[:c], self.qkv.bias[:c]).view(b, n, h, dh).transpose(1, 2)
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
        return self.proj(y.transpose(1, 2).reshape(b, n, c))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.d_model)
        self.attn = CausalSelfAttention(cfg)
        self.ln2 = nn.LayerNorm(cfg.d_model)
        self.mlp = nn.Sequential(
            nn.Linear(cfg.d_model, 4 * cfg.d_model),
            nn.GELU(),
            nn.Linear(4 * cfg.d_model, cfg.d_model),
            nn.Dropout(cfg.dropout),
        )

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x), attn_mask)
        return x + self.mlp(self.ln2(x))


class SacoTransformer(nn.Module):
    state_mean: torch.Tensor
    state_std: torch.Tensor
    rtg_scale: torch.Tensor
    ctg_scale: torch.Tensor
    history_decay: torch.Tensor
    history_weights: torch.Tensor
    action_table: torch.Tensor
    action_scale: torch.Tensor

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        if cfg.token_layout not in TOKEN_LAYOUTS:
            raise ValueError(f"token_layout must be one of {TOKEN_LAYOUTS}")
        if cfg.d_model % cfg.n_heads:
            raise ValueError("d_model must be divisible by n_heads")
        if cfg.action_features and (cfg.token_layout != "step" or cfg.objective != "value"):
            raise ValueError("a model scoring actions by their features takes the step layout and the value objective")
        if cfg.table_rows and cfg.table_rows < cfg.num_actions:
            raise ValueError(f"the action table needs at least num_actions ({cfg.num_actions}) rows")
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
        self.by_features = cfg.action_features > 0
        # what a step's action is to the history and the next step's token: its one-hot (K) or its row (F)
        self.action_width = cfg.action_features if self.by_features else k
        if self.by_features:
            f = cfg.action_features
            rows = cfg.table_rows or k
            self.register_buffer("action_table", torch.zeros(rows, f))  # the training catalog's rows, raw units
            self.register_buffer("action_scale", torch.ones(f))  # the table's columns are read divided by it
            self.embed_action_row = nn.Linear(f, h)  # a padding step's row is 0: the bias is "no previous action"
            # two towers: value o of action a = <user_tower(x)[o], action_tower(row a)> (+ the tower's bias)
            self.action_tower = nn.Sequential(
                nn.Linear(f, 4 * h), nn.GELU(), nn.Linear(4 * h, 4 * h), nn.GELU(), nn.Linear(4 * h, h)
            )
            self.user_tower = nn.Linear(h, 4 * h)
        else:
            self.embed_action = nn.Embedding(k + 1, h)  # index k = "no previous action" (first step)
            self.register_buffer("action_table", torch.zeros(0, 0), persistent=False)
            self.register_buffer("action_scale", torch.ones(0), persistent=False)
        self.embed_rtg = nn.Linear(1, h)
        self.embed_ctg = nn.Linear(1, h)
        self.embed_outcome = nn.Linear(2, h)  # previous reward and cost (step layout)
        self.register_buffer("history_decay", torch.tensor(list(cfg.history_decays) or [0.0], dtype=torch.float32))
        # derived from history_decay (not saved in checkpoints; kept by the TorchScript export)
        self.register_buffer(
            "history_weights", self._history_weights(self.history_decay, cfg.context_length), persistent=False
        )
        self.use_history = len(cfg.history_decays) > 0
        self.embed_history = nn.Linear(max(len(cfg.history_decays), 1) * (self.action_width + 3), h)
        self.embed_time = nn.Embedding(cfg.max_timestep, h)
        self.embed_lambda = nn.Linear(1, h)
        self.ln_in = nn.LayerNorm(h)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList([Block(cfg) for _ in range(cfg.n_layers - 1)])
        self.last_block = Block(cfg)
        self.ln_out = nn.LayerNorm(h)
        if not self.by_features:
            self.action_head = nn.Linear(h, k)
            self.value_head = nn.Linear(h, 4 * k)  # revenue now, cost now, revenue later, cost later
        self.apply(self._init_weights)
        if self.by_features:
            # the towers keep torch's own initialisation: at std 0.02 their product starts ~1e-4 and trains slowly
            # (0.81 against 0.77 of the oracle's gain on the bundle world, 3 seeds x 2 spend levels)
            for layer in [*self.action_tower, self.user_tower]:
                if isinstance(layer, nn.Linear):
                    layer.reset_parameters()

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def set_action_table(self, table: torch.Tensor, scale: torch.Tensor | None = None) -> None:
        """The training catalog's action rows [table_rows, F] (raw units); each column is read divided by its
        largest magnitude here (1 for a column of zeros), so a catalog with larger values reads above 1.
        `scale` [F] (positive), if given, is the columns' divisor instead: a model's weights read the columns at
        the scale they were trained at, so a model that goes on training on another table keeps its own."""
        if not self.by_features or tuple(table.shape) != tuple(self.action_table.shape):
            raise ValueError(f"the action table must be {tuple(self.action_table.shape)}, got {tuple(table.shape)}")
        if scale is None:
            largest = table.abs().amax(dim=0)
            scale = torch.where(largest > 0, largest, torch.ones_like(largest))
        elif tuple(scale.shape) != tuple(self.action_scale.shape) or not bool(
            (torch.isfinite(scale) & (scale > 0)).all()
        ):
            raise ValueError(
                f"the action table's scale must be {tuple(self.action_scale.shape)} positive numbers, got "
                f"{scale.tolist()}"
            )
        self.action_table.copy_(table)
        self.action_scale.copy_(scale)

    def action_rows(self, actions: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        """[..., F] the scaled rows of `table` [T, F] for action indices `actions` [...]."""
        return F.embedding(actions, table / self.action_scale)

    def action_values(self, x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        """[..., 4, T] the value heads (scaled units) of every action of `table` [T, F] for vectors x [..., h]."""
        users = self.user_tower(x).unflatten(-1, (4, -1))  # [..., 4, h]
        return users @ self.action_tower(table / self.action_scale).T

    def set_normalisation(
        self, state_mean: torch.Tensor, state_std: torch.Tensor, rtg_scale: float, ctg_scale: float
    ) -> None:
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
        table: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Embedded tokens [B, M, h] and which of them are real [B, M]; `table` the action rows (by features)."""
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
            if hasattr(self, "embed_action_row"):  # the previous action's row (zeros where there is none)
                rows = self.action_rows(torch.where(prev_real, prev_action, torch.zeros_like(prev_action)), table)
                prev_embedded = self.embed_action_row(rows * prev_real.unsqueeze(-1).to(rows.dtype))
            else:
                prev_action = torch.where(prev_real, prev_action, torch.full_like(prev_action, self.num_actions))
                prev_embedded = self.embed_action(prev_action)
            # step j's reward and cost are the drops of the to-go values to step j+1 (0 where j+1 is unknown)
            to_go = torch.cat([g, c], dim=2)  # [B, L, 2]
            real = mask.to(g.dtype).unsqueeze(-1)
            outcomes = torch.cat(
                [(to_go[:, :-1] - to_go[:, 1:]) * real[:, :-1] * real[:, 1:], torch.zeros_like(to_go[:, :1])], dim=1
            )
            prev_outcome = torch.cat([torch.zeros_like(to_go[:, :1]), outcomes[:, :-1]], dim=1)
            # the state, to-go, outcome and history embeddings are linear in their inputs: one matmul over
            # the concatenated inputs with the concatenated weights is their sum (same parameters)
            inputs = [s, to_go, prev_outcome]
            weights = [self.embed_state.weight, self.embed_rtg.weight, self.embed_ctg.weight, self.embed_outcome.weight]
            bias = self.embed_state.bias + self.embed_rtg.bias + self.embed_ctg.bias + self.embed_outcome.bias
            if self.use_history:
                inputs.append(self._history(actions, outcomes, real, table))
                weights.append(self.embed_history.weight)
                bias = bias + self.embed_history.bias
            x = F.linear(torch.cat(inputs, dim=2), torch.cat(weights, dim=1), bias) + prev_embedded + common
            return self.drop(self.ln_in(x)), mask
        if not hasattr(self, "embed_action"):
            raise RuntimeError("the dt4 layout names actions by index")
        tokens = torch.stack(
            [self.embed_rtg(g), self.embed_ctg(c), self.embed_state(s), self.embed_action(actions)], dim=2
        ) + common.unsqueeze(2)
        # the last step's action token is the decision being made: drop it, so the state token is last
        x = tokens.reshape(b, 4 * n, -1)[:, :-1]
        return self.drop(self.ln_in(x)), mask.repeat_interleave(4, dim=1)[:, :-1]

    def _history(
        self, actions: torch.Tensor, outcomes: torch.Tensor, real: torch.Tensor, table: torch.Tensor
    ) -> torch.Tensor:
        """[B, L, D*(A+3)]: for each step, decayed sums over the steps before it of (the action: its one-hot,
        or its row of `table`; reward, cost, purchase), one set per decay rate. `outcomes` [B, L, 2]: each
        step's reward and cost."""
        b, n = actions.shape
        if self.by_features:
            onehot = self.action_rows(actions, table).to(outcomes.dtype) * real
        else:
            onehot = F.one_hot(actions, self.num_actions).to(outcomes.dtype) * real
        onehot[:, -1] = 0.0  # the last step's action is the decision being made
        events = torch.cat([onehot, outcomes, (outcomes[:, :, :1] > 0).to(outcomes.dtype)], dim=2)
        weights = self.history_weights
        if n <= weights.shape[0]:  # the bottom-right block: weights depend on i - j only
            weights = weights[weights.shape[0] - n :, :, weights.shape[0] - n :]
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
    def _attention_mask(token_mask: torch.Tensor) -> torch.Tensor:
        """[B, 1, M, M]: causal over real tokens; every token sees itself (no NaN on padding)."""
        m = token_mask.shape[1]
        rows = torch.arange(m, device=token_mask.device).unsqueeze(1)
        cols = torch.arange(m, device=token_mask.device).unsqueeze(0)
        allowed = (cols <= rows).unsqueeze(0) & token_mask.unsqueeze(1)
        return (allowed | (cols == rows).unsqueeze(0)).unsqueeze(1)

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
        """Training: action logits [B, L, K] (none when scoring by features: [B, L, 0]) and value heads
        [B, L, 4, K] (scaled units; by features every row of the action table: [B, L, 4, table rows]) at every
        step."""
        b, n = actions.shape
        x, token_mask = self._tokens(states, actions, rtg, ctg, timesteps, lam, mask, self.action_table)
        attn_mask = self._attention_mask(token_mask)
        for block in self.blocks:
            x = block(x, attn_mask)
        x = self.ln_out(self.last_block(x, attn_mask))
        if not self.step_layout:
            x = torch.cat([x, x[:, -1:]], dim=1).reshape(b, n, 4, -1)[:, :, 2]  # read at the state tokens
        if hasattr(self, "user_tower"):
            return x.new_zeros(b, n, 0), self.action_values(x, self.action_table)
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
        """Decision scores [B, K] for the last step (no coupon and each coupon alone), read from the training
        forward: the reference that `PolicyModule` (what is exported) computes with folded weights."""
        logits, values = self(states, actions, rtg, ctg, timesteps, lam, mask)
        if self.value_objective:
            v = values[:, -1, :, : self.num_actions]
            revenue = (v[:, 0] + self.future_weight * v[:, 2]) * self.rtg_scale
            cost = (v[:, 1] + self.future_weight * v[:, 3]) * self.ctg_scale
            return revenue - lam.view(-1, 1) * cost
        return logits[:, -1]


class PolicyModule(ScoringModule):
    """What is exported: raw inputs -> decision scores [B, K] for the last step (argmax = the policy).

    `SacoTransformer.decide` with the model's linear maps folded together when this module is built, since a
    CPU forward over ~10 steps costs mostly per-op overhead:
    - a step token is a row of a per-timestep table plus one matmul of [states, to-go values, (lambda,)
      history]. The state normalisation, every bias and the embeddings of the previous step's action and
      outcome are in the two (that step's events are the history with decay 0), and the history's time
      weights are one block matrix over the flattened events;
    - the last block runs for the decision token only, with the key projection folded into the query's:
      q.(W_k x + b_k) = (W_k^T q).x + q.b_k, and the softmax drops q.b_k; and the value projection into the
      output projection: W_o (W_v sum_j w_j x_j + b_v), as the weights sum to 1;
    - the value heads give revenue and cost in raw units directly, future weight included.
    The folded tensors are a snapshot: build this module after training. They are non-persistent buffers (the
    state dict is the model's); the TorchScript export keeps them.
    """

    token_weight: torch.Tensor
    time_rows: torch.Tensor
    history_decays: torch.Tensor
    history_matrix: torch.Tensor
    to_go_scale: torch.Tensor
    action_ids: torch.Tensor
    query_weight: torch.Tensor
    query_bias: torch.Tensor
    mix_weight: torch.Tensor
    mix_bias: torch.Tensor
    head_weight: torch.Tensor
    head_bias: torch.Tensor
    cost_weight: torch.Tensor
    cost_bias: torch.Tensor

    def __init__(self, model: SacoTransformer) -> None:
        super().__init__()
        self.model = model
        self.num_actions = model.num_actions
        self.by_features = model.by_features
        self.context_length = model.cfg.context_length
        self.n_heads = model.cfg.n_heads
        self.step_layout = model.step_layout
        self.use_lambda = model.use_lambda
        self.value_objective = model.value_objective
        with torch.no_grad():
            exact = copy.deepcopy(model).double()  # folded in float64, then rounded once
            self._fold_tokens(exact)
            self._fold_attention(exact.last_block.attn)
            self._fold_heads(exact)

    def _buffer(self, name: str, value: torch.Tensor) -> None:
        if value.is_floating_point():
            value = value.to(self.model.state_mean.dtype)
        self.register_buffer(name, value.detach().clone().contiguous(), persistent=False)

    def _fold_tokens(self, m: SacoTransformer) -> None:
        k = m.num_actions
        state = m.embed_state.weight / m.state_std  # W (s - mean) / std = (W / std) s - (W / std) mean
        none: torch.Tensor
        action_weight: torch.Tensor
        if m.by_features:  # the previous action's row times its weights; no previous action: the bias alone
            none, action_weight = m.embed_action_row.bias, m.embed_action_row.weight
        else:  # "no previous action"; a one-hot action a adds row a - row none
            none = m.embed_action.weight[k]
            action_weight = (m.embed_action.weight[:k] - none).T
        weights = [state, m.embed_rtg.weight, m.embed_ctg.weight]
        bias = m.embed_state.bias - state @ m.state_mean + m.embed_rtg.bias + m.embed_ctg.bias + none
        if self.use_lambda:
            weights.append(m.embed_lambda.weight)
            bias = bias + m.embed_lambda.bias
        # the previous step's events: one-hot action, reward, cost (and the purchase, not read here)
        weights += [action_weight, m.embed_outcome.weight, torch.zeros_like(m.embed_rtg.weight)]
        bias = bias + m.embed_outcome.bias
        if m.use_history:
            weights.append(m.embed_history.weight)
            bias = bias + m.embed_history.bias
        self._buffer("token_weight", torch.cat(weights, dim=1).T)  # [inputs, h], as addmm_ takes it
        self._buffer("time_rows", m.embed_time.weight + bias)
        history = m.history_decay if m.use_history else m.history_decay[:0]  # (a placeholder decay when none)
        decays = torch.cat([history.new_zeros(1), history])
        self._buffer("history_decays", decays)
        self._buffer("history_matrix", self._history_matrix(decays, self.context_length, m.action_width + 3))
        self._buffer("to_go_scale", torch.stack([m.rtg_scale, m.ctg_scale]).view(2, 1))
        self._buffer("action_ids", torch.arange(k, device=decays.device).view(k, 1))

    @staticmethod
    def _history_matrix(decays: torch.Tensor, n: int, f: int) -> torch.Tensor:
        """[F*(L-1), L*D*F]: events [B, F, L-1] (steps 0..L-2; the last step's are never read), flattened,
        times this are the decayed sums of `SacoTransformer._history` per step and decay, [B, L, D*F]."""
        weights = SacoTransformer._history_weights(decays, n)[:, :, : n - 1].permute(2, 0, 1)  # [L-1, L, D]
        eye = torch.eye(f, dtype=decays.dtype, device=decays.device)
        return (eye.view(f, 1, 1, 1, f) * weights.unsqueeze(-1)).reshape(f * (n - 1), n * len(decays) * f)

    def _fold_attention(self, attn: CausalSelfAttention) -> None:
        c = attn.proj.weight.shape[0]
        h, dh = self.n_heads, c // self.n_heads
        w_q, w_k, w_v = (w.view(h, dh, c) for w in attn.qkv.weight.split(c))
        b_q, _, b_v = attn.qkv.bias.split(c)
        scale = 1.0 / math.sqrt(dh)
        self._buffer("query_weight", (w_k.transpose(1, 2) @ w_q).reshape(h * c, c) * scale)
        self._buffer("query_bias", (w_k.transpose(1, 2) @ b_q.view(h, dh, 1)).reshape(h * c) * scale)
        w_o = attn.proj.weight.view(c, h, dh).transpose(0, 1)  # [h, c, dh]
        self._buffer("mix_weight", (w_o @ w_v).transpose(0, 1).reshape(c, h * c))
        self._buffer("mix_bias", attn.proj.weight @ b_v + attn.proj.bias)

    def _fold_heads(self, m: SacoTransformer) -> None:
        if m.by_features:  # the user tower's [revenue; cost; cost now] rows, raw units (times an action's tower)
            self.action_tower = self.model.action_tower  # run as trained (float32), on the rows of any table
            w = m.user_tower.weight.view(4, -1, m.user_tower.in_features)
            b = m.user_tower.bias.view(4, -1)
            fw = m.future_weight
            weight = torch.cat([(w[0] + fw * w[2]) * m.rtg_scale, (w[1] + fw * w[3]) * m.ctg_scale, w[1] * m.ctg_scale])
            bias = torch.cat([(b[0] + fw * b[2]) * m.rtg_scale, (b[1] + fw * b[3]) * m.ctg_scale, b[1] * m.ctg_scale])
            cost_weight, cost_bias = weight[:0], bias[:0]
        elif self.value_objective:  # [revenue now + fw * later; cost now + fw * later] in raw units
            w = m.value_head.weight.view(4, self.num_actions, -1)
            b = m.value_head.bias.view(4, self.num_actions)
            fw = m.future_weight
            weight = torch.cat([(w[0] + fw * w[2]) * m.rtg_scale, (w[1] + fw * w[3]) * m.ctg_scale])
            bias = torch.cat([(b[0] + fw * b[2]) * m.rtg_scale, (b[1] + fw * b[3]) * m.ctg_scale])
            cost_weight, cost_bias = w[1] * m.ctg_scale, b[1] * m.ctg_scale  # the cost now, raw units
        else:
            weight, bias = m.action_head.weight, m.action_head.bias
            cost_weight, cost_bias = weight[:0], bias[:0]  # no value heads: `score_terms` is not used
        self._buffer("head_weight", weight)
        self._buffer("head_bias", bias)
        self._buffer("cost_weight", cost_weight)
        self._buffer("cost_bias", cost_bias)

    def terms(self, x: torch.Tensor) -> torch.Tensor:
        """[B, 3K] (value objective, whose scores do not read lambda): the revenue and the cost terms of the
        score (score = revenue - lambda * cost, future weight included), then each coupon's expected cost now
        for this user. Raw units. The service scores any lambda from one forward, and `expected`
        reservations start from the cost now."""
        if hasattr(self, "action_tower"):
            return self._table_terms(x, self.model.action_table[: self.num_actions])
        terms = F.linear(x, self.head_weight, self.head_bias)
        return torch.cat([terms, F.linear(x, self.cost_weight, self.cost_bias)], dim=1)

    def _table_terms(self, x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        """`terms` [B, 3T] of the actions of `table` [T, F] (a model scoring by features)."""
        towers = self.action_tower(table / self.model.action_scale)  # [T, h]
        users = F.linear(x, self.head_weight, self.head_bias).view(x.shape[0], 3, -1)
        return torch.matmul(users, towers.T).flatten(1)

    @torch.jit.export
    def catalog_terms(
        self,
        states: torch.Tensor,
        actions: torch.Tensor,
        rtg: torch.Tensor,
        ctg: torch.Tensor,
        timesteps: torch.Tensor,
        lam: torch.Tensor,
        mask: torch.Tensor,
        table: torch.Tensor,
    ) -> torch.Tensor:
        """`score_terms` [B, 3T] over the actions of another action table [T, F] (a model scoring by features:
        a catalog with coupons or bundles the model never saw); `actions` index its rows."""
        if not hasattr(self, "action_tower"):
            raise RuntimeError("this model scores actions by index: it has no catalog_terms")
        x = self._encode(states, actions, rtg, ctg, timesteps, lam, mask, table)
        return self._table_terms(x, table)

    @torch.jit.export
    def catalog_scores(
        self,
        states: torch.Tensor,
        actions: torch.Tensor,
        rtg: torch.Tensor,
        ctg: torch.Tensor,
        timesteps: torch.Tensor,
        lam: torch.Tensor,
        mask: torch.Tensor,
        table: torch.Tensor,
    ) -> torch.Tensor:
        """`forward` [B, T] over the actions of another action table (`catalog_terms`)."""
        terms = self.catalog_terms(states, actions, rtg, ctg, timesteps, lam, mask, table)
        t = table.shape[0]
        return torch.addcmul(terms[:, :t], lam.view(-1, 1), terms[:, t : 2 * t], value=-1.0)

    def encode(
        self,
        states: torch.Tensor,
        actions: torch.Tensor,
        rtg: torch.Tensor,
        ctg: torch.Tensor,
        timesteps: torch.Tensor,
        lam: torch.Tensor,
        mask: torch.Tensor,
    ) -> torch.Tensor:
        """The last layer's output at the decision token, [B, h]."""
        return self._encode(states, actions, rtg, ctg, timesteps, lam, mask, self.model.action_table)

    def _encode(
        self,
        states: torch.Tensor,
        actions: torch.Tensor,
        rtg: torch.Tensor,
        ctg: torch.Tensor,
        timesteps: torch.Tensor,
        lam: torch.Tensor,
        mask: torch.Tensor,
        table: torch.Tensor,
    ) -> torch.Tensor:
        if self.step_layout:
            x = self._step_tokens(states, actions, rtg, ctg, timesteps, lam, mask, table)
            token_mask = mask
        else:
            x, token_mask = self.model._tokens(states, actions, rtg, ctg, timesteps, lam, mask, table)
        if len(self.model.blocks) > 0:
            attn_mask = self.model._attention_mask(token_mask)
            for block in self.model.blocks:
                x = block(x, attn_mask)
        return self.model.ln_out(self._last_block(x, token_mask))

    def scores(self, x: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
        if hasattr(self, "action_tower"):
            k = self.num_actions
            terms = self._table_terms(x, self.model.action_table[:k])
            return torch.addcmul(terms[:, :k], lam.view(-1, 1), terms[:, k : 2 * k], value=-1.0)
        scores = F.linear(x, self.head_weight, self.head_bias)
        if self.value_objective:
            k = self.num_actions
            return torch.addcmul(scores[..., :k], lam.view(-1, 1), scores[..., k:], value=-1.0)  # rev - lam * cost
        return scores

    def _step_tokens(
        self,
        states: torch.Tensor,
        actions: torch.Tensor,
        rtg: torch.Tensor,
        ctg: torch.Tensor,
        timesteps: torch.Tensor,
        lam: torch.Tensor,
        mask: torch.Tensor,
        table: torch.Tensor,
    ) -> torch.Tensor:
        """`SacoTransformer._tokens` of the step layout (eval mode), [B, L, h]."""
        b, n = actions.shape
        # the steps' events with time as the last dim (each shift is one slice): [B, F, L-1], steps 0..L-2
        real = mask.to(states.dtype).unsqueeze(1)
        to_go = torch.stack([rtg, ctg], dim=1) / self.to_go_scale  # [B, 2, L], as in training
        outcomes = (to_go[..., :-1] - to_go[..., 1:]) * (real[..., :-1] * real[..., 1:])  # reward and cost
        if self.by_features:  # each step's action row [B, F, L-1] (zeros on padding)
            rows = self.model.action_rows(torch.where(mask, actions, torch.zeros_like(actions))[..., :-1], table)
            taken = rows.transpose(1, 2).to(states.dtype) * real[..., :-1]
        else:  # one-hot [B, K, L-1]
            taken = (torch.where(mask, actions, self.num_actions)[..., :-1].unsqueeze(1) == self.action_ids).to(
                states.dtype
            )
        events = torch.cat([taken, outcomes, (outcomes[:, :1] > 0).to(states.dtype)], dim=1)
        matrix = self.history_matrix
        if n != self.context_length:
            matrix = self._history_matrix(self.history_decays, n, events.shape[1])
        history = torch.mm(events.view(b, -1), matrix).view(b, n, -1)
        inputs = [states, to_go.transpose(1, 2)]
        if self.use_lambda:
            inputs.append(lam.view(b, 1, 1).expand(b, n, 1))
        inputs.append(history)
        x = self.time_rows.index_select(0, timesteps.clamp(0, self.time_rows.shape[0] - 1).view(-1))
        x.addmm_(torch.cat(inputs, dim=2).view(b * n, -1), self.token_weight)  # in place: one [B*L, h] less
        return self.model.ln_in(x.view(b, n, -1))

    def _last_block(self, x: torch.Tensor, token_mask: torch.Tensor) -> torch.Tensor:
        """The last block's output [B, h] at the decision token (the last), which sees every real token."""
        block = self.model.last_block
        b = x.shape[0]
        keys = block.ln1(x)
        ignored = ~token_mask
        ignored.select(1, -1).fill_(False)  # the decision token sees itself (no NaN when every step is padding)
        q = F.linear(keys.select(1, -1), self.query_weight, self.query_bias).view(b, self.n_heads, -1)
        scores = torch.bmm(q, keys.transpose(1, 2)).masked_fill(ignored.unsqueeze(1), float("-inf"))
        weights = torch.exp(scores - scores.amax(dim=-1, keepdim=True))
        weights = weights / weights.sum(dim=-1, keepdim=True)
        mixed = torch.bmm(weights, keys).view(b, -1)  # [B, heads * h]: each head's weighted input
        x = x.select(1, -1) + F.linear(mixed, self.mix_weight, self.mix_bias)
        return x + block.mlp(block.ln2(x))


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def flops_per_decision(cfg: ModelConfig) -> float:
    """Rough multiply-adds for one user's decision at full context (for size/quality reports)."""
    tokens = cfg.context_length * (1 if cfg.token_layout == "step" else 4)
    per_token = cfg.n_layers * 12 * cfg.d_model**2
    attention = cfg.n_layers * 2 * tokens * tokens * cfg.d_model
    return float(tokens * per_token + attention)
