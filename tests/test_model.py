import numpy as np
import pytest
import tensorflow as tf

from dstrain.model import DeepSpeech, ModelConfig, ctc_loss, sparse_labels


def test_shapes_and_context_window():
    model = DeepSpeech(ModelConfig(n_hidden=8, n_context=2), n_input=3, n_classes=5)
    x = tf.reshape(tf.range(2 * 4 * 3, dtype=tf.float32), [2, 4, 3])
    w = model.context_window(x).numpy()
    assert w.shape == (2, 4, 15)
    # Frame 0 sees two zero frames, itself and frames 1, 2.
    np.testing.assert_array_equal(w[0, 0], np.concatenate([np.zeros(6), x[0, 0], x[0, 1], x[0, 2]]))
    assert model((x, tf.constant([4, 2]))).shape == (2, 4, 5)


def test_relu_clip_and_layer_count():
    model = DeepSpeech(ModelConfig(n_hidden=4, relu_clip=0.5, dropout_rate=0.0), n_input=2, n_classes=3)
    model((tf.zeros([1, 1, 2]), tf.ones([1], tf.int32)))
    names = [w.name.split("/")[1] for w in model.trainable_weights]
    assert sorted(set(names)) == ["layer_1", "layer_2", "layer_3", "layer_4", "layer_5", "layer_6"]
    y = model.dense_layer(1, tf.fill([1, 1, 38], 100.0), training=False)
    assert float(tf.reduce_max(y)) <= 0.5


def test_sparse_labels_keep_label_zero_and_drop_padding():
    labels = tf.constant([[0, 3, 0], [2, 0, 0]])
    sp = sparse_labels(labels, tf.constant([3, 1]))
    assert sp.indices.numpy().tolist() == [[0, 0], [0, 1], [0, 2], [1, 0]]
    assert sp.values.numpy().tolist() == [0, 3, 0, 2]


def test_ctc_loss_uses_last_class_as_blank():
    # Two frames, one label 'a' (0): paths a-a, a-blank, blank-a. With uniform logits over 2 classes,
    # P = 3 * 0.25, so loss = -ln 0.75.
    logits = tf.zeros([1, 2, 2])
    loss = ctc_loss(logits, tf.constant([2]), tf.constant([[0]]), tf.constant([1]))
    assert float(loss[0]) == pytest.approx(-np.log(0.75), rel=1e-5)


def test_one_utterance_overfits():
    tf.random.set_seed(0)
    model = DeepSpeech(ModelConfig(n_hidden=32, dropout_rate=0.0), n_input=26, n_classes=29)
    opt = tf.keras.optimizers.Adam(0.01)
    x = tf.random.stateless_normal([1, 40, 26], seed=[1, 2])
    y = tf.constant([[8, 9, 0, 8, 9]])

    @tf.function
    def step():
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(
                ctc_loss(model((x, tf.constant([40])), training=True), tf.constant([40]), y, tf.constant([5]))
            )
        grads = tape.gradient(loss, model.trainable_variables)
        opt.apply_gradients(zip(grads, model.trainable_variables))
        return loss

    losses = [float(step()) for _ in range(60)]
    assert losses[-1] < 0.2 * losses[0]


def test_front_end_turns_stored_log_mel_into_deepspeech_mfcc():
    from conftest import DATA

    from dstrain.audio import read_audio
    from dstrain.features import FeatureConfig, log_mel, mfcc, power_spectrogram
    from dstrain.model import FrontEnd

    fc = FeatureConfig()
    samples = read_audio(str(DATA / "LDC93S1.wav"))
    stored = log_mel(power_spectrogram(samples, fc), fc)
    plain = FrontEnd(fc, normalize=False)
    np.testing.assert_allclose(
        plain(tf.constant(stored[None].astype(np.float16))).numpy()[0], mfcc(samples, fc), atol=0.05
    )
    np.testing.assert_allclose(plain(tf.constant(stored[None])).numpy()[0], mfcc(samples, fc), atol=1e-4)
    normed = FrontEnd(fc, normalize=True)
    normed.build(None)
    mean, std = stored.mean(0), stored.std(0)
    normed.set_statistics(mean, std)
    expected = ((stored - mean) / std) @ __import__("dstrain.features", fromlist=["dct_matrix"]).dct_matrix(fc)
    np.testing.assert_allclose(normed(tf.constant(stored[None])).numpy()[0], expected, atol=1e-4)


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
def test_mixed_precision_keeps_logits_and_front_end_in_float32(policy):
    from dstrain.features import FeatureConfig

    tf.keras.mixed_precision.set_global_policy(policy)
    try:
        model = DeepSpeech.for_features(ModelConfig(n_hidden=8), FeatureConfig(), 5)
        out = model((tf.zeros([2, 7, 40], tf.float16), tf.constant([7, 3])))
        assert out.dtype == tf.float32 and model.front_end.compute_dtype == "float32"
        assert model.dense[0].compute_dtype == policy.split("_")[1]
    finally:
        tf.keras.mixed_precision.set_global_policy("float32")
