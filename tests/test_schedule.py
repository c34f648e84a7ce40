import pytest

from dstrain.train.schedule import DevHistory, OptimConfig, learning_rate


def test_learning_rate_scales_with_world_and_warms_up():
    cfg = OptimConfig(learning_rate=0.001, warmup_steps=4)
    assert [round(learning_rate(cfg, 8, s), 6) for s in range(6)] == [0.002, 0.004, 0.006, 0.008, 0.008, 0.008]
    assert learning_rate(OptimConfig(learning_rate=0.001, scale_lr=False), 8, 100) == 0.001
    assert learning_rate(OptimConfig(learning_rate=0.001), 2, 100, plateau_factor=0.1) == pytest.approx(0.0002)


def test_early_stop_needs_es_epochs_without_an_improvement_of_min_delta():
    cfg = OptimConfig(early_stop=True, es_epochs=2, es_min_delta=0.1)
    h = DevHistory()
    decisions = []
    for loss in [5.0, 4.0, 3.95, 3.92, 3.5]:
        h.add(loss)
        decisions.append(h.should_stop(cfg))
    # After 3.95 and 3.92 the best of the last two epochs is not 0.1 better than 4.0: stop at epoch 4.
    assert decisions == [False, False, False, True, False]
    assert not DevHistory([5.0, 5.0, 5.0]).should_stop(OptimConfig(early_stop=False, es_epochs=1))


def test_plateau_reduces_once_per_plateau_and_is_saved():
    cfg = OptimConfig(reduce_lr_on_plateau=True, plateau_epochs=2, plateau_reduction=0.5, es_min_delta=0.0)
    h = DevHistory()
    reductions = []
    for loss in [3.0, 2.0, 2.5, 2.4, 2.3, 2.2, 1.0]:
        h.add(loss)
        reductions.append(h.update_plateau(cfg))
    # Epochs 3-4 do not beat 2.0: reduce after epoch 4; counting restarts, epochs 5-6 still do not: reduce again.
    assert reductions == [False, False, False, True, False, True, False]
    assert h.plateau_factor == 0.25
    assert DevHistory.from_dict(h.to_dict()) == h


def test_bad_values_name_the_field():
    with pytest.raises(ValueError, match="plateau_reduction"):
        OptimConfig(plateau_reduction=0)
    with pytest.raises(ValueError, match="learning_rate"):
        OptimConfig(learning_rate=-1)
