"""The sequential synthetic world (the paper's SY dataset, with carry-over effects users really show).

Each user has fixed latent traits and a drifting observable state. Every round the platform picks one of
K treatments (0 = no coupon, k >= 1 a coupon of face value `coupon_values[k]`); the user buys with a
probability that depends on the state, the treatment, and the user's history:

    logit p = base_i + w·x_t + habit * H_t - reference * R_t * [a = 0]
              + sensitivity_i * lift(a) * exp(-fatigue * F_t)

    H_{t+1} = decay * H_t + bought_t                 habit: purchases raise later purchase propensity
    F_{t+1} = decay * F_t + [a_t > 0]                fatigue: repeated coupons lose their effect
    R_{t+1} = decay * R_t + value(a_t) / max value   reference: a big coupon lowers the next no-coupon response

A purchase brings revenue `basket_i` (reward) and costs the coupon's face value (cost; an unredeemed
coupon costs nothing). States follow Gaussian transitions x_{t+1} = rho x_t + (1 - rho) mu_i + noise, and
the observed features are noisy views of the state and of the traits, so history reveals users.

Every effect has a strength; with all three at zero the world is myopic (today's treatment changes
nothing later). The world knows its exact expected responses, so any policy is scored exactly (sum of
expected revenue and cost given the realised history, with common random numbers across policies), and a
perfect-information myopic oracle can be computed.

Default strengths (fixed before looking at any policy result):
- habit 0.5: a purchase multiplies the odds of buying next round by ~1.6, decaying by half a round
  later; repeat-purchase lifts of this size are typical of retail panel data.
- fatigue 0.35: after two coupons in a row a coupon keeps ~55% of its lift, in line with the
  diminishing response to repeated promotions reported in the promotion literature.
- reference 0.6: after the largest coupon the no-coupon odds fall by ~45% for a round (reference-price
  effect: a discount makes the undiscounted price look expensive), smaller coupons proportionally less.

The bundle world. Given a coupon catalog (`WorldConfig.catalog`, a contract/catalog.py `Catalog`), the
actions are no coupon (0) and the catalog's bundles (action j = `catalog.bundles[j - 1]`, singletons
included); `coupon_values` is then unused. A coupon c gives user i the discount

    d_ic = value                        amount coupon
           min(value x basket_i, cap)   percent coupon (value a fraction), rounded to the cent
           0                            when its min_spend exceeds basket_i: it cannot be redeemed

and lifts the logit by l_ic = 1.2 sqrt(d_ic / full_lift_discount): the plain world's lift, whose scale
(its largest face value, 10) is full_lift_discount, so amount coupons 2, 5, 10 alone are the plain world. A
bundle B lifts the logit by

    L_iB = sum_c l_ic + bundle_synergy * (sum_c l_ic - max_c l_ic)

in place of lift(a) above: each coupon beyond the bundle's strongest adds (1 + bundle_synergy) x its own
lift. bundle_synergy = 0 is additive in the logit (a bundle adds nothing beyond its parts), > 0
super-additive (coupons that remove different purchase barriers, say a discount and free delivery,
reinforce each other), < 0 sub-additive down to -1, where a bundle lifts as its strongest coupon alone
(saturation: a second discount on the same basket adds little). The default is 0: nothing assumed; the
bundle benchmark (benchmarks/bundle_world.py) also runs 0.5 and -0.5, fixed before any result: with 0.5 the
second coupon of a bundle works 1.5 times as hard as alone (a moderate complementarity), with -0.5 half as
hard. As a coupon's lift is concave in its discount, two equal coupons lift as one coupon of their summed
discount at synergy sqrt(2) - 2 (about -0.6): above it bundling pays even without complementarity.

Redemption: a purchase redeems every coupon of the bundle that applies (a buyer uses every discount the
basket qualifies for), so a bought bundle costs sum_c d_ic and an unbought one nothing; the expected cost
is p_iB x sum_c d_ic, exact. Fatigue counts a bundle as one coupon; the reference memory grows by the
bundle's discount / full_lift_discount and lowers the response to every action that gives this user no
discount (no coupon, or a bundle whose coupons all need a larger basket). A discount is not capped at
the basket (as in the plain world).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np

from contract.catalog import KINDS, PERCENT, Catalog
from contract.money import CENTS_PER_UNIT, rounded_cents

LIFT_AT_SCALE = 1.2  # the logit lift of the largest plain coupon (a discount of the lift scale)


@dataclass(frozen=True)
class WorldConfig:
    users: int = 10_000
    rounds: int = 10
    feature_dim: int = 8
    coupon_values: tuple[float, ...] = (0.0, 2.0, 5.0, 10.0)  # face value per action; action 0 = no coupon
    habit: float = 0.5
    fatigue: float = 0.35
    reference: float = 0.6
    decay: float = 0.5  # per-round decay of the habit / fatigue / reference memories
    state_rho: float = 0.8  # state persistence in the Gaussian transition
    state_noise: float = 0.35
    feature_noise: float = 0.3
    seed: int = 0
    catalog: Catalog | None = None  # the bundle world's coupons and bundles (module docstring); None: plain
    bundle_synergy: float = 0.0  # >= -1; 0 additive in the logit, > 0 super-additive, < 0 saturating
    full_lift_discount: float = 10.0  # currency units: the discount whose lift is LIFT_AT_SCALE (with a catalog)

    @property
    def num_actions(self) -> int:
        if self.catalog is not None:
            return 1 + len(self.catalog.bundles)
        return len(self.coupon_values)

    def myopic(self) -> WorldConfig:
        """The same world with every carry-over effect off."""
        return replace(self, habit=0.0, fatigue=0.0, reference=0.0)


@dataclass
class UserPopulation:
    """Latent traits of N users (fixed for their lifetime)."""

    base: np.ndarray  # [N] base purchase logit
    sensitivity: np.ndarray  # [N] coupon sensitivity (>= 0)
    basket: np.ndarray  # [N] revenue of a purchase
    mean_state: np.ndarray  # [N, S] long-run state
    trait_view: np.ndarray  # [N, 3] traits mixed into the observed features


@dataclass
class WorldState:
    """What evolves during an episode: the Gaussian state and the three memories."""

    x: np.ndarray  # [N, S]
    habit: np.ndarray  # [N]
    fatigue: np.ndarray  # [N]
    reference: np.ndarray  # [N]
    t: int = 0


@dataclass
class StepResponse:
    reward: np.ndarray  # realised revenue [N]
    cost: np.ndarray  # realised coupon cost [N]
    expected_reward: np.ndarray  # [N] E[reward | history, action]
    expected_cost: np.ndarray  # [N]


@dataclass
class Episode:
    """One run of N users for T rounds; `features[t]` is what a policy sees at round t."""

    config: WorldConfig
    users: UserPopulation
    state: WorldState
    rng_noise: np.random.Generator
    purchase_uniforms: np.ndarray  # [T, N] common random numbers: same draws whatever the policy
    state_noise: np.ndarray  # [T, N, S]
    feature_noise: np.ndarray  # [T, N, D]
    history: list[StepResponse] = field(default_factory=list)


class SyntheticWorld:
    """Generates users and runs episodes; exposes exact expected responses for every action."""

    STATE_DIM = 4

    def __init__(self, config: WorldConfig) -> None:
        self.config = config
        rng = np.random.default_rng(10_007 + config.seed)  # world structure: same for every episode
        s, d = self.STATE_DIM, config.feature_dim
        self.state_weights = rng.normal(0.0, 0.35, size=s)
        self.sens_weights = rng.normal(0.0, 0.3, size=s)
        # Features: a random mixing of state (S) and trait views (3), the rest pure noise columns.
        self.feature_mixing = rng.normal(0.0, 1.0, size=(s + 3, d)) / np.sqrt(s + 3)
        top = min(d, s + 3)
        self.feature_mixing[:top, :top] += np.eye(top)
        self.catalog = config.catalog
        if config.catalog is None:
            values = np.asarray(config.coupon_values, dtype=np.float64)
            if values[0] != 0.0 or np.any(values[1:] <= 0):
                raise ValueError("coupon_values must start with 0 (no coupon) followed by positive face values")
            self.values = values  # [K] what each action costs when redeemed
            # Lift grows with face value but with diminishing returns.
            self.lift = np.sqrt(values / values.max()) * LIFT_AT_SCALE
            self.reference_scale = float(values.max())
        else:
            self._set_catalog(config.catalog)

    def _set_catalog(self, catalog: Catalog) -> None:
        cfg = self.config
        if not cfg.bundle_synergy >= -1.0:
            raise ValueError(
                f"bundle_synergy must be at least -1 (a bundle lifts as its best coupon), got {cfg.bundle_synergy}"
            )
        if not cfg.full_lift_discount > 0:
            raise ValueError(f"full_lift_discount must be above 0 (currency units), got {cfg.full_lift_discount}")
        self.coupons = catalog.features()
        position = {int(a): i for i, a in enumerate(self.coupons.actions)}
        # [C, B] 1 where bundle j holds coupon i (catalog order)
        self.membership = np.zeros((len(position), len(catalog.bundles)))
        self.bundle_members = [np.array([position[a] for a in b.coupons]) for b in catalog.bundles]
        for j, members in enumerate(self.bundle_members):
            self.membership[members, j] = 1.0
        # [K] what an action reserves at worst (a percent coupon at its cap), as the ledger does
        self.values = np.array([0.0] + [catalog.bundle_cost(b) / CENTS_PER_UNIT for b in catalog.bundles])
        # [K] an action's lift when each of its coupons gives its worst-case discount
        self.lift = self._bundle_lift(self._coupon_lift(self.coupons.worst_case[None, :]))[0]
        self.reference_scale = cfg.full_lift_discount

    @property
    def rounds(self) -> int:
        return self.config.rounds

    @property
    def num_actions(self) -> int:
        return self.config.num_actions

    # ---- population and episodes -------------------------------------------------------------
    def sample_users(self, n: int, seed: int) -> UserPopulation:
        rng = np.random.default_rng(seed)
        base = rng.normal(-1.6, 0.6, size=n)
        sensitivity = np.clip(rng.gamma(2.0, 0.5, size=n) - 0.15, 0.0, None)
        basket = np.exp(rng.normal(np.log(30.0), 0.45, size=n))
        mean_state = rng.normal(0.0, 1.0, size=(n, self.STATE_DIM))
        trait_view = np.stack(
            [(base + 1.6) / 0.6, (sensitivity - 0.85) / 0.7, (np.log(basket) - np.log(30.0)) / 0.45], axis=1
        )
        return UserPopulation(base, sensitivity, basket, mean_state, trait_view)

    def start(self, n: int | None = None, seed: int | None = None) -> Episode:
        cfg = self.config
        n = cfg.users if n is None else n
        seed = cfg.seed if seed is None else seed
        users = self.sample_users(n, seed)
        rng = np.random.default_rng(seed + 1_000_003)
        x0 = users.mean_state + rng.normal(0.0, 0.5, size=users.mean_state.shape)
        state = WorldState(x=x0, habit=np.zeros(n), fatigue=np.zeros(n), reference=np.zeros(n))
        return Episode(
            config=cfg,
            users=users,
            state=state,
            rng_noise=rng,
            purchase_uniforms=rng.random(size=(cfg.rounds, n)),
            state_noise=rng.normal(0.0, cfg.state_noise, size=(cfg.rounds, n, self.STATE_DIM)),
            feature_noise=rng.normal(0.0, cfg.feature_noise, size=(cfg.rounds, n, cfg.feature_dim)),
        )

    def features(self, ep: Episode) -> np.ndarray:
        """Observed features [N, D] at the current round."""
        latent = np.concatenate([ep.state.x, ep.users.trait_view], axis=1)
        return (latent @ self.feature_mixing + ep.feature_noise[ep.state.t]).astype(np.float32)

    # ---- the bundle world's coupons ------------------------------------------------------------
    def discounts(self, users: UserPopulation) -> np.ndarray:
        """[N, C] each coupon's discount (currency units) on each user's basket; 0 where the basket is
        below the coupon's min_spend (module docstring)."""
        c, basket = self.coupons, users.basket[:, None]
        off = np.where(c.kind[None, :] == KINDS.index(PERCENT), np.minimum(c.value * basket, c.cap), c.value)
        cents = rounded_cents(off) / CENTS_PER_UNIT
        return np.where(basket >= c.min_spend[None, :], cents, 0.0)

    def _coupon_lift(self, discounts: np.ndarray) -> np.ndarray:
        return np.sqrt(discounts / self.config.full_lift_discount) * LIFT_AT_SCALE

    def _bundle_lift(self, coupon_lift: np.ndarray) -> np.ndarray:
        """[N, K] from [N, C]: column 0 no coupon (0), then each bundle's L_iB (module docstring)."""
        total = coupon_lift @ self.membership
        strongest = np.stack([coupon_lift[:, m].max(axis=1) for m in self.bundle_members], axis=1)
        lift = total + self.config.bundle_synergy * (total - strongest)
        return np.concatenate([np.zeros((len(coupon_lift), 1)), lift], axis=1)

    def action_lift(self, users: UserPopulation) -> np.ndarray:
        """Each action's lift of the logit before sensitivity and fatigue: [1, K] in the plain world (the
        same for every user), [N, K] in the bundle world."""
        if self.catalog is None:
            return self.lift[None, :]
        return self._bundle_lift(self._coupon_lift(self.discounts(users)))

    def action_cost(self, users: UserPopulation) -> np.ndarray:
        """What each action costs when the user buys: [1, K] face values in the plain world, [N, K] the sum of
        the bundle's discounts in the bundle world."""
        if self.catalog is None:
            return self.values[None, :]
        d = self.discounts(users)
        return np.concatenate([np.zeros((len(d), 1)), d @ self.membership], axis=1)

    def purchase_probability(self, ep: Episode) -> np.ndarray:
        """P(purchase) [N, K] for every action at the current round, given the realised history."""
        cfg, u, st = self.config, ep.users, ep.state
        base = u.base + st.x @ self.state_weights + cfg.habit * st.habit
        sens = u.sensitivity * np.exp(st.x @ self.sens_weights * 0.5)
        uplift = sens[:, None] * self.action_lift(u) * np.exp(-cfg.fatigue * st.fatigue)[:, None]
        logit = base[:, None] + uplift
        if self.catalog is None:
            logit[:, 0] -= cfg.reference * st.reference
        else:  # the undiscounted price: no coupon, or a bundle none of whose coupons applies to the basket
            logit -= (cfg.reference * st.reference)[:, None] * (self.action_cost(u) == 0)
        return 1.0 / (1.0 + np.exp(-logit))

    def expected_response(self, ep: Episode) -> tuple[np.ndarray, np.ndarray]:
        """Exact E[reward], E[cost] [N, K] for every action at the current round."""
        p = self.purchase_probability(ep)
        return p * ep.users.basket[:, None], p * self.action_cost(ep.users)

    def step(self, ep: Episode, actions: np.ndarray) -> StepResponse:
        """Apply `actions` [N] at the current round and advance the episode."""
        cfg, st = self.config, ep.state
        if st.t >= cfg.rounds:
            raise RuntimeError("episode is over")
        actions = np.asarray(actions, dtype=np.int64)
        if actions.shape != (st.x.shape[0],) or actions.min() < 0 or actions.max() >= cfg.num_actions:
            raise ValueError(f"actions must be {st.x.shape[0]} integers in 0..{cfg.num_actions - 1}")
        p_all = self.purchase_probability(ep)
        idx = np.arange(actions.shape[0])
        p = p_all[idx, actions]
        bought = (ep.purchase_uniforms[st.t] < p).astype(np.float64)
        value = self.values[actions] if self.catalog is None else self.action_cost(ep.users)[idx, actions]
        response = StepResponse(
            reward=bought * ep.users.basket,
            cost=bought * value,
            expected_reward=p * ep.users.basket,
            expected_cost=p * value,
        )
        st.habit = cfg.decay * st.habit + bought
        st.fatigue = cfg.decay * st.fatigue + (actions > 0)
        st.reference = cfg.decay * st.reference + value / self.reference_scale
        st.x = cfg.state_rho * st.x + (1 - cfg.state_rho) * ep.users.mean_state + ep.state_noise[st.t]
        st.t += 1
        ep.history.append(response)
        return response


def behaviour_actions(
    rng: np.random.Generator, features: np.ndarray, num_actions: int, bias: float = 0.0
) -> tuple[np.ndarray, np.ndarray]:
    """The logging policy: uniform over K actions, or (bias > 0) tilted toward coupons for users whose
    first feature is high, like a heuristic targeting rule. Returns actions and their propensities."""
    n = features.shape[0]
    if bias == 0.0:
        probs = np.full((n, num_actions), 1.0 / num_actions)
    else:
        score = np.tanh(features[:, 0]) * bias
        logits = np.zeros((n, num_actions))
        logits[:, 1:] = score[:, None]
        probs = np.exp(logits - logits.max(axis=1, keepdims=True))
        probs /= probs.sum(axis=1, keepdims=True)
    cum = probs.cumsum(axis=1)
    u = np.asarray(rng.random(n)).reshape(-1, 1)
    actions = np.minimum((u > cum).sum(axis=1), num_actions - 1)
    return actions, probs[np.arange(n), actions]
