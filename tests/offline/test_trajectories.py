import numpy as np

from offline.logs import logs_table, validate_table
from offline.trajectories import build_trajectories, make_batch, split_users


def small_logs():
    # user a: 3 steps, user b: 2 steps (given out of order)
    table = logs_table(
        np.array(["a", "a", "a", "b", "b"]),
        np.array([0, 1, 2, 7, 3]),
        np.array([1, 0, 2, 1, 0]),
        np.array([2.0, 0.0, 5.0, 2.0, 0.0]),
        np.array([10.0, 4.0, 0.0, 1.0, 3.0]),
        np.arange(10, dtype=np.float32).reshape(5, 2),
    )
    return validate_table(table)


def test_rtg_ctg_and_so_far_arithmetic():
    traj = build_trajectories(small_logs(), context_length=2)
    # a: rewards 10, 4, 0 ; costs 2, 0, 5.  b (sorted by t): t=3 -> reward 3 cost 0, t=7 -> reward 1 cost 2
    assert traj.rtg.tolist() == [14.0, 4.0, 0.0, 4.0, 1.0]
    assert traj.ctg.tolist() == [7.0, 5.0, 5.0, 2.0, 2.0]
    assert traj.reward_before.tolist() == [0, 1000, 1400, 0, 300]  # cents
    assert traj.cost_before.tolist() == [0, 200, 200, 0, 0]
    assert traj.position.tolist() == [0, 1, 2, 0, 1]
    assert traj.initial_targets() == (9.0, 4.5)


def test_windows_cover_every_step_once_right_aligned():
    traj = build_trajectories(small_logs(), context_length=2)
    w = traj.windows()
    assert w.tolist() == [[0, 1], [1, 2], [3, 4]]  # the last window keeps step 1 as context
    b = make_batch(traj, w, "value", np.zeros(3), 0.0, 0.0, 64)
    assert b.loss_mask.tolist() == [[True, True], [False, True], [True, True]]
    owned = sorted(int(i) for i in w[b.loss_mask.numpy()])
    assert owned == [0, 1, 2, 3, 4]  # every step in exactly one loss


def test_value_batch_uses_targets_minus_history_and_no_hindsight():
    traj = build_trajectories(small_logs(), context_length=3)
    window = np.array([[0, 1, 2]])
    b = make_batch(traj, window, "value", np.array([0.5]), initial_rtg=20.0, initial_ctg=6.0, max_timestep=2)
    assert b.input("rtg")[0].tolist() == [20.0, 10.0, 6.0]
    assert b.input("ctg")[0].tolist() == [6.0, 4.0, 4.0]
    assert b.input("timesteps")[0].tolist() == [0, 1, 1]  # clipped to max_timestep - 1
    assert b.input("actions")[0].tolist() == [1, 0, 0] and b.taken[0].tolist() == [1, 0, 2]  # the last is decided
    assert b.value_targets[0, :, 0].tolist() == [10.0, 4.0, 0.0]  # revenue now
    assert b.value_targets[0, :, 2].tolist() == [4.0, 0.0, 0.0]  # revenue later


def test_dt_lagrangian_conditions_on_lambda_weighted_return():
    traj = build_trajectories(small_logs(), context_length=3)
    b = make_batch(traj, np.array([[0, 1, 2]]), "dt-lagrangian", np.array([2.0]), 0.0, 0.0, 64)
    assert b.input("rtg")[0].tolist() == [14.0 - 2 * 7.0, 4.0 - 2 * 5.0, 0.0 - 2 * 5.0]
    lit = make_batch(traj, np.array([[0, 1, 2]]), "dt-literal", np.array([2.0]), 0.0, 0.0, 64)
    assert lit.input("rtg")[0].tolist() == [14.0, 4.0, 0.0]


def test_split_is_by_user_and_disjoint():
    train, val = split_users(100, 0.2, seed=1)
    assert len(val) == 20 and len(train) == 80
    assert not set(train) & set(val)
