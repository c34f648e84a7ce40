"""DeepSpeech 0.9.3 (TF1) checkpoint import: logits of the imported Keras model equal those of DeepSpeech's graph.

The reference rebuilds DeepSpeech's ``create_model`` in TF1 graph mode from the checkpoint: overlapping
windows by identity-filter ``conv1d`` (``create_overlapping_windows``), time-major dense layers, and the
``BlockLSTM`` op that ``LSTMBlockFusedCell(forget_bias=0)`` runs; a numpy LSTM with gates i, j, f, o pins
down that op's layout independently.
"""

import os

import numpy as np
import pytest
import tensorflow as tf

from dstrain.model import DeepSpeech, ModelConfig
from dstrain.train.deepspeech_import import LSTM_SCOPE, convert_lstm_weights, load_deepspeech_checkpoint

N_HIDDEN, N_CONTEXT, N_INPUT, N_CLASSES = 8, 2, 26, 5
RELU_CLIP = 20.0
WINDOW = 2 * N_CONTEXT + 1


def _weights(seed: int = 0, n_classes: int = N_CLASSES) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    h = N_HIDDEN

    def r(*shape, scale=0.4):
        return (scale * rng.standard_normal(shape)).astype(np.float32)

    return {
        "layer_1/weights": r(WINDOW * N_INPUT, h, scale=0.15),
        "layer_1/bias": r(h),
        "layer_2/weights": r(h, h),
        "layer_2/bias": r(h),
        "layer_3/weights": r(h, h),
        "layer_3/bias": r(h),
        f"{LSTM_SCOPE}/kernel": r(2 * h, 4 * h, scale=0.6),
        f"{LSTM_SCOPE}/bias": r(4 * h, scale=1.0),
        "layer_5/weights": r(h, h),
        "layer_5/bias": r(h),
        "layer_6/weights": r(h, n_classes),
        "layer_6/bias": r(n_classes),
    }


def _optimizer_state(weights: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    slots = {f"{k}/Adam": np.full_like(v, 7.0) for k, v in weights.items()}
    slots.update({f"{k}/Adam_1": np.full_like(v, 9.0) for k, v in weights.items()})
    slots.update(
        beta1_power=np.float32(0.9),
        beta2_power=np.float32(0.999),
        learning_rate=np.float32(1e-4),
        global_step=np.int64(1466475),
    )
    return slots


def _save_tf1(path: str, variables: dict[str, np.ndarray]) -> str:
    """A TF1 (name-based) checkpoint written by ``tf.compat.v1.train.Saver``, as DeepSpeech writes them."""
    graph = tf.Graph()
    with graph.as_default():
        for name, value in variables.items():
            tf.compat.v1.get_variable(name, initializer=tf.constant(value), use_resource=False)
        saver = tf.compat.v1.train.Saver()
        with tf.compat.v1.Session(graph=graph) as sess:
            sess.run(tf.compat.v1.global_variables_initializer())
            return saver.save(sess, path, global_step=1466475)


def _deepspeech_logits(prefix: str, x: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """DeepSpeech 0.9.3's ``create_model`` (inference: no dropout), weights restored from ``prefix`` by name;
    returns batch-major ``[B, T, classes]``."""
    graph = tf.Graph()
    with graph.as_default():
        reader = tf.train.load_checkpoint(prefix)
        var = {
            name: tf.compat.v1.get_variable(name, shape=reader.get_variable_to_shape_map()[name])
            for name in _weights(n_classes=reader.get_variable_to_shape_map()["layer_6/bias"][0])
        }
        batch_x = tf.constant(x)
        batch_size = tf.shape(batch_x)[0]
        # create_overlapping_windows
        eye_filter = tf.constant(np.eye(WINDOW * N_INPUT).reshape(WINDOW, N_INPUT, WINDOW * N_INPUT), tf.float32)
        bx = tf.nn.conv1d(input=batch_x, filters=eye_filter, stride=1, padding="SAME")
        bx = tf.reshape(bx, [batch_size, -1, WINDOW, N_INPUT])
        bx = tf.transpose(bx, perm=[1, 0, 2, 3])
        bx = tf.reshape(bx, [-1, N_INPUT + 2 * N_INPUT * N_CONTEXT])

        def dense(name, inp, relu=True):
            out = tf.nn.bias_add(tf.matmul(inp, var[f"{name}/weights"]), var[f"{name}/bias"])
            return tf.minimum(tf.nn.relu(out), RELU_CLIP) if relu else out

        l3 = dense("layer_3", dense("layer_2", dense("layer_1", bx)))
        l3 = tf.reshape(l3, [-1, batch_size, N_HIDDEN])
        # rnn_impl_lstmblockfusedcell: LSTMBlockFusedCell(n_hidden, forget_bias=0) -> BlockLSTM + output mask
        zeros = tf.zeros([batch_size, N_HIDDEN])
        diag = tf.zeros([N_HIDDEN])
        seq_len = tf.constant(lengths)
        h = tf.raw_ops.BlockLSTM(
            seq_len_max=tf.cast(tf.reduce_max(seq_len), tf.int64),
            x=l3,
            cs_prev=zeros,
            h_prev=zeros,
            w=var[f"{LSTM_SCOPE}/kernel"],
            wci=diag,
            wcf=diag,
            wco=diag,
            b=var[f"{LSTM_SCOPE}/bias"],
            forget_bias=0.0,
            cell_clip=-1.0,
            use_peephole=False,
        ).h
        mask = tf.transpose(tf.sequence_mask(seq_len, tf.shape(l3)[0], dtype=tf.float32), [1, 0])
        h = h * mask[:, :, None]
        out = tf.reshape(h, [-1, N_HIDDEN])
        n_classes = var["layer_6/bias"].shape[0]
        logits = tf.reshape(dense("layer_6", dense("layer_5", out), relu=False), [-1, batch_size, n_classes])
        with tf.compat.v1.Session(graph=graph) as sess:
            tf.compat.v1.train.Saver(var_list=var).restore(sess, prefix)
            return np.transpose(sess.run(logits), [1, 0, 2])


def _model(n_classes: int = N_CLASSES) -> DeepSpeech:
    tf.random.set_seed(1)
    cfg = ModelConfig(n_hidden=N_HIDDEN, n_context=N_CONTEXT, relu_clip=RELU_CLIP, dropout_rate=0.0)
    return DeepSpeech(cfg, n_input=N_INPUT, n_classes=n_classes)


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(5)
    x = rng.standard_normal((2, 11, N_INPUT)).astype(np.float32)
    lengths = np.array([11, 7], np.int32)
    x[1, 7:] = 0.0  # padding
    return x, lengths


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    weights = _weights()
    prefix = _save_tf1(str(tmp_path_factory.mktemp("ds093") / "best_dev"), {**weights, **_optimizer_state(weights)})
    return prefix, weights


def _valid(a: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    return np.concatenate([a[b, :n] for b, n in enumerate(lengths)])


def test_block_lstm_gate_layout_is_i_j_f_o():
    """The reference's LSTM op against a numpy LSTM: kernel over concat([x, h]), gates i, j, f, o, forget_bias 0."""
    rng = np.random.default_rng(3)
    t_len, b, n_in, h = 5, 2, 3, 4
    x = rng.standard_normal((t_len, b, n_in)).astype(np.float32)
    w = rng.standard_normal((n_in + h, 4 * h)).astype(np.float32)
    bias = rng.standard_normal(4 * h).astype(np.float32)
    z, d = np.zeros((b, h), np.float32), np.zeros(h, np.float32)
    got = tf.raw_ops.BlockLSTM(
        seq_len_max=np.int64(t_len),
        x=x,
        cs_prev=z,
        h_prev=z,
        w=w,
        wci=d,
        wcf=d,
        wco=d,
        b=bias,
        forget_bias=0.0,
        cell_clip=-1.0,
        use_peephole=False,
    ).h.numpy()
    sig = lambda v: 1 / (1 + np.exp(-v))  # noqa: E731
    hs, hp, c = [], np.zeros((b, h)), np.zeros((b, h))
    for t in range(t_len):
        i, j, f, o = np.split(np.concatenate([x[t], hp], 1) @ w + bias, 4, axis=1)
        c = sig(f) * c + sig(i) * np.tanh(j)
        hp = sig(o) * np.tanh(c)
        hs.append(hp)
    np.testing.assert_allclose(got, np.stack(hs), atol=1e-5)


def test_context_window_order_matches_deepspeech(data):
    x, _ = data
    eye = np.eye(WINDOW * N_INPUT).reshape(WINDOW, N_INPUT, WINDOW * N_INPUT).astype(np.float32)
    ds = tf.nn.conv1d(input=x, filters=eye, stride=1, padding="SAME").numpy()
    np.testing.assert_array_equal(_model().context_window(tf.constant(x)).numpy(), ds)


def test_imported_logits_match_deepspeech_graph(checkpoint, data):
    prefix, _ = checkpoint
    x, lengths = data
    expected = _deepspeech_logits(prefix, x, lengths)
    model = _model()
    report = load_deepspeech_checkpoint(prefix, model)
    got = model((tf.constant(x), tf.constant(lengths)), training=False).numpy()
    assert np.abs(expected).max() > 0.5  # non-trivial logits
    np.testing.assert_allclose(_valid(got, lengths), _valid(expected, lengths), atol=1e-5, rtol=0)
    assert sum(line.startswith("loaded ") for line in report) == 6

    # A loader that copied TF1's (i, j, f, o) blocks into Keras (i, f, c, o) unchanged fails that comparison.
    _, weights = checkpoint
    kernel, bias = weights[f"{LSTM_SCOPE}/kernel"], weights[f"{LSTM_SCOPE}/bias"]
    model.lstm.cell.kernel.assign(kernel[:N_HIDDEN])
    model.lstm.cell.recurrent_kernel.assign(kernel[N_HIDDEN:])
    model.lstm.cell.bias.assign(bias)
    wrong = model((tf.constant(x), tf.constant(lengths)), training=False).numpy()
    assert np.abs(_valid(wrong, lengths) - _valid(expected, lengths)).max() > 1e-2


def test_directory_with_checkpoint_state_file(checkpoint, data):
    prefix, weights = checkpoint
    model = _model()
    load_deepspeech_checkpoint(os.path.dirname(prefix), model)
    np.testing.assert_array_equal(model.dense[0].kernel.numpy(), weights["layer_1/weights"])


def test_optimizer_state_is_ignored(checkpoint):
    prefix, weights = checkpoint
    model = _model()
    report = load_deepspeech_checkpoint(prefix, model)
    ignored = [line for line in report if line.startswith("ignored ")]
    assert len(ignored) == 2 * len(weights) + 4
    assert all("(optimizer state)" in line for line in ignored)
    assert any("layer_1/weights/Adam_1" in line for line in ignored)
    assert any("global_step" in line for line in ignored)
    np.testing.assert_array_equal(model.out.bias.numpy(), weights["layer_6/bias"])


def test_drop_source_layers_keeps_top_layer_fresh(tmp_path):
    weights = _weights(seed=2, n_classes=29)  # a checkpoint for another alphabet
    prefix = _save_tf1(str(tmp_path / "ckpt"), weights)
    model = _model(n_classes=N_CLASSES)
    model((tf.zeros([1, 1, N_INPUT]), tf.ones([1], tf.int32)))
    fresh_kernel, fresh_bias = model.out.kernel.numpy().copy(), model.out.bias.numpy().copy()

    with pytest.raises(ValueError) as err:
        load_deepspeech_checkpoint(prefix, model)
    assert str(err.value) == (
        f"layer_6/weights: checkpoint [{N_HIDDEN}, 29], model [{N_HIDDEN}, {N_CLASSES}]: "
        "alphabet size differs; use --drop_source_layers 1"
    )
    assert not np.array_equal(model.dense[0].kernel.numpy(), weights["layer_1/weights"])  # nothing assigned

    report = load_deepspeech_checkpoint(prefix, model, drop_source_layers=1)
    np.testing.assert_array_equal(model.out.kernel.numpy(), fresh_kernel)
    np.testing.assert_array_equal(model.out.bias.numpy(), fresh_bias)
    for i, name in enumerate(("layer_1", "layer_2", "layer_3")):
        np.testing.assert_array_equal(model.dense[i].kernel.numpy(), weights[f"{name}/weights"])
    np.testing.assert_array_equal(model.dense5.bias.numpy(), weights["layer_5/bias"])
    k, rk, b = convert_lstm_weights(weights[f"{LSTM_SCOPE}/kernel"], weights[f"{LSTM_SCOPE}/bias"])
    np.testing.assert_array_equal(model.lstm.cell.recurrent_kernel.numpy(), rk)
    assert any(line.startswith("kept fresh") and "layer_6/weights" in line for line in report)


def test_drop_three_layers_needs_no_lstm_or_top_in_checkpoint(tmp_path):
    weights = {k: v for k, v in _weights().items() if k.startswith(("layer_1", "layer_2", "layer_3"))}
    prefix = _save_tf1(str(tmp_path / "ckpt"), weights)
    model = _model()
    with pytest.raises(ValueError, match=f"not in the checkpoint: {LSTM_SCOPE}/kernel"):
        load_deepspeech_checkpoint(prefix, model, drop_source_layers=2)
    report = load_deepspeech_checkpoint(prefix, model, drop_source_layers=3)
    assert sum(line.startswith("kept fresh") for line in report) == 3
    np.testing.assert_array_equal(model.dense[2].bias.numpy(), weights["layer_3/bias"])
    with pytest.raises(ValueError, match="drop_source_layers must be in 0..5"):
        load_deepspeech_checkpoint(prefix, model, drop_source_layers=6)


def test_hidden_size_mismatch_names_variable(checkpoint):
    prefix, _ = checkpoint
    model = DeepSpeech(ModelConfig(n_hidden=16, n_context=N_CONTEXT), n_input=N_INPUT, n_classes=N_CLASSES)
    msg = r"^layer_1/weights: checkpoint \[130, 8\], model \[130, 16\]: n_hidden differs"
    with pytest.raises(ValueError, match=msg):
        load_deepspeech_checkpoint(prefix, model)


def _layer_norm_weights(seed: int = 4) -> dict[str, np.ndarray]:
    """A --layer_norm checkpoint: tf.contrib.layers.layer_norm's gain and bias inside dense layers 1, 2, 3 and 5."""
    rng = np.random.default_rng(seed)
    weights = _weights(seed)
    for layer in ("layer_1", "layer_2", "layer_3", "layer_5"):
        weights[f"{layer}/LayerNorm/gamma"] = (1 + 0.3 * rng.standard_normal(N_HIDDEN)).astype(np.float32)
        weights[f"{layer}/LayerNorm/beta"] = (0.3 * rng.standard_normal(N_HIDDEN)).astype(np.float32)
    return weights


def _deepspeech_layer_norm_logits(weights: dict[str, np.ndarray], x: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """DeepSpeech 0.9.3's create_model with --layer_norm, in numpy: dense() is bias_add(matmul), clipped ReLU, then
    contrib's layer_norm over the units (moments over axis 1 of the [B*T, units] rows, variance_epsilon 1e-12)."""

    def dense(name, inp, relu=True, norm=True):
        out = inp @ weights[f"{name}/weights"] + weights[f"{name}/bias"]
        if not relu:
            return out
        out = np.minimum(np.maximum(out, 0), RELU_CLIP)
        if norm:
            mean, var = out.mean(-1, keepdims=True), out.var(-1, keepdims=True)
            out = (out - mean) / np.sqrt(var + 1e-12) * weights[f"{name}/LayerNorm/gamma"] + weights[
                f"{name}/LayerNorm/beta"
            ]
        return out

    eye = np.eye(WINDOW * N_INPUT).reshape(WINDOW, N_INPUT, WINDOW * N_INPUT).astype(np.float32)
    windows = tf.nn.conv1d(input=x, filters=eye, stride=1, padding="SAME").numpy()
    l3 = dense("layer_3", dense("layer_2", dense("layer_1", windows)))
    h = (
        tf.raw_ops.BlockLSTM(
            seq_len_max=np.int64(x.shape[1]),
            x=np.transpose(l3, [1, 0, 2]).astype(np.float32),
            cs_prev=np.zeros((len(x), N_HIDDEN), np.float32),
            h_prev=np.zeros((len(x), N_HIDDEN), np.float32),
            w=weights[f"{LSTM_SCOPE}/kernel"],
            wci=np.zeros(N_HIDDEN, np.float32),
            wcf=np.zeros(N_HIDDEN, np.float32),
            wco=np.zeros(N_HIDDEN, np.float32),
            b=weights[f"{LSTM_SCOPE}/bias"],
            forget_bias=0.0,
            cell_clip=-1.0,
            use_peephole=False,
        )
        .h.numpy()
        .transpose(1, 0, 2)
    )
    return dense("layer_6", dense("layer_5", h), relu=False)


def test_layer_norm_checkpoint_imports_into_a_layer_norm_model(tmp_path, data):
    x, lengths = data
    weights = _layer_norm_weights()
    prefix = _save_tf1(str(tmp_path / "ln"), weights)
    plain = _model()
    with pytest.raises(
        ValueError, match=r"trained with --layer_norm \(layer_1/LayerNorm/beta.*pass --layer_norm to load it"
    ):
        load_deepspeech_checkpoint(prefix, plain)

    tf.random.set_seed(1)
    model = DeepSpeech(
        ModelConfig(n_hidden=N_HIDDEN, n_context=N_CONTEXT, relu_clip=RELU_CLIP, dropout_rate=0.0, layer_norm=True),
        n_input=N_INPUT,
        n_classes=N_CLASSES,
    )
    report = load_deepspeech_checkpoint(prefix, model)
    assert sum(line.startswith("loaded ") for line in report) == 6
    assert any("layer_5/LayerNorm/gamma" in line and line.startswith("loaded ") for line in report)
    np.testing.assert_array_equal(model.norms[3].beta.numpy(), weights["layer_5/LayerNorm/beta"])
    got = model((tf.constant(x), tf.constant(lengths)), training=False).numpy()
    expected = _deepspeech_layer_norm_logits(weights, x, lengths)
    np.testing.assert_allclose(_valid(got, lengths), _valid(expected, lengths), atol=1e-4, rtol=0)
    # The gains and biases matter: the same weights without them give other logits.
    without = _model()
    load_deepspeech_checkpoint(_save_tf1(str(tmp_path / "plain"), _weights(4)), without)
    assert (
        np.abs(
            _valid(without((tf.constant(x), tf.constant(lengths))).numpy(), lengths) - _valid(expected, lengths)
        ).max()
        > 0.1
    )

    # And a model built with --layer_norm refuses a checkpoint trained without it.
    with pytest.raises(ValueError, match="trained without --layer_norm, so leave --layer_norm out"):
        load_deepspeech_checkpoint(_save_tf1(str(tmp_path / "plain2"), _weights()), model)
