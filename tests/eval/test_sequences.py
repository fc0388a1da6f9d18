"""The sequence Frechet distance: the built-in embedder, masks, the embedder loader and its errors."""

import numpy as np
import pytest

from lsync_jax.eval import sequences as sq


def make_sequences(n=40, length=6, channels=3, seed=0):
    return np.random.default_rng(seed).normal(size=(n, length, channels))


def scaled_factory(scale=1.0):
    """A factory the loader finds by module path (`tests.eval.test_sequences:scaled_factory`)."""
    return lambda batch, mask: scale * sq.mean_std_embedding(batch, mask)


def test_mean_std_embedding_uses_real_steps_only():
    x = np.array([[[1.0, 10.0], [3.0, 10.0], [np.nan, 1e9]]])
    out = sq.mean_std_embedding(x, np.array([[True, True, False]]))
    np.testing.assert_allclose(out, [[2.0, 10.0, 1.0, 0.0]])
    np.testing.assert_allclose(sq.mean_std_embedding(x[:, :2]), out)  # no mask: every step


def test_identical_sets_are_at_zero_and_a_shift_at_its_square():
    x = make_sequences()
    embed = sq.load_embedder("mean_std")
    for method in ("sqrtm", "eigh"):
        same = sq.sequence_fd(embed, x, x, method=method)
        assert abs(same["fd"]) < 1e-8 and same["num_samples"] == same["num_reference"] == 40 and same["dim"] == 6
    # a constant shift moves every channel's mean by delta and leaves the std: FD = C delta^2 exactly
    shifted = sq.sequence_fd(embed, x + 0.5, x)
    np.testing.assert_allclose(shifted["fd"], 3 * 0.5**2, rtol=1e-6)
    assert sq.sequence_fd(embed, 1.5 * x, x)["fd"] > 0.05


def test_masked_padding_is_ignored():
    x = make_sequences(n=30, length=8, seed=1)
    lengths = np.random.default_rng(2).integers(2, 9, len(x))
    mask = np.arange(8)[None, :] < lengths[:, None]
    padded = np.where(mask[..., None], x, 1e6)  # garbage where the mask says padding
    embed = sq.mean_std_embedding
    # the same sequences unpadded, one per batch, as a stream of (batch, None) pairs
    unpadded = [(x[i:i + 1, :n], None) for i, n in enumerate(lengths)]
    masked = sq.sequence_statistics(embed, padded, mask, batch_size=7)
    reference = sq.sequence_statistics(embed, unpadded)
    np.testing.assert_allclose(masked.mu, reference.mu, rtol=1e-10)
    np.testing.assert_allclose(masked.sigma, reference.sigma, rtol=1e-8, atol=1e-12)
    assert abs(sq.sequence_fd(embed, padded, unpadded, sample_mask=mask)["fd"]) < 1e-8
    assert sq.sequence_fd(embed, padded, unpadded)["fd"] > 1e6  # unmasked, the garbage counts
    # 0/1 masks are masks too
    assert abs(sq.sequence_fd(embed, padded, unpadded, sample_mask=mask.astype(np.int32))["fd"]) < 1e-8


def test_reference_statistics_are_saved_and_reused(tmp_path):
    x, y = make_sequences(seed=3), make_sequences(seed=4) + 0.2
    embed = sq.mean_std_embedding
    path = str(tmp_path / "ref_stats.npz")
    sq.sequence_statistics(embed, x).save(path)
    ref = sq.SequenceStats.load(path)
    assert ref.count == 40 and ref.dim == 6
    np.testing.assert_allclose(sq.sequence_fd(embed, y, ref)["fd"], sq.sequence_fd(embed, y, x)["fd"], rtol=1e-12)
    with pytest.raises(ValueError, match="reference_mask given with reference statistics"):
        sq.sequence_fd(embed, y, ref, reference_mask=np.ones(x.shape[:2], bool))
    with pytest.raises(ValueError, match="another embedder"):
        sq.sequence_fd(lambda b, m: b.mean(axis=1), y, ref)
    np.savez(tmp_path / "other.npz", mu=np.zeros(2))
    with pytest.raises(ValueError, match="other.npz holds no sigma, count"):
        sq.SequenceStats.load(str(tmp_path / "other.npz"))


def test_bad_sequences_masks_and_embeddings_are_named():
    x = make_sequences(n=4)
    embed = sq.mean_std_embedding
    with pytest.raises(ValueError, match=r"numeric \(N, L, C\), got shape \(4, 6\)"):
        sq.sequence_statistics(embed, x[..., 0])
    with pytest.raises(ValueError, match=r"mask of shape \(4, 5\)"):
        sq.sequence_statistics(embed, x, np.ones((4, 5), bool))
    mask = np.ones((4, 6), bool)
    mask[2] = False
    with pytest.raises(ValueError, match=r"sequences \[2\] have no real step"):
        sq.sequence_statistics(embed, x, mask)
    with pytest.raises(ValueError, match="bool or 0/1"):
        sq.sequence_statistics(embed, x, np.full((4, 6), 2))
    with pytest.raises(ValueError, match=r"embedder .*<lambda> returned shape \(4,\)"):
        sq.sequence_statistics(lambda b, m: b.sum(axis=(1, 2)), x)
    with pytest.raises(ValueError, match="non-finite"):
        sq.sequence_statistics(lambda b, m: np.full((len(b), 2), np.nan), x)
    with pytest.raises(ValueError, match="at least 2 sequences, got 1"):
        sq.sequence_statistics(embed, x[:1])
    with pytest.raises(ValueError, match=r"\(sequences, mask or None\) pairs"):
        sq.sequence_statistics(embed, [x])


def test_loader_finds_modules_files_and_factories(tmp_path):
    x, y = make_sequences(seed=5), make_sequences(seed=6)
    base = sq.sequence_fd(sq.mean_std_embedding, x, y)["fd"]
    by_module = sq.load_embedder("tests.eval.test_sequences:scaled_factory", scale=2.0)
    np.testing.assert_allclose(sq.sequence_fd(by_module, x, y)["fd"], 4 * base, rtol=1e-8)
    path = tmp_path / "my_embedder.py"
    path.write_text("import numpy as np\n\n"
                    "def make_embedder(power=1):\n"
                    "    return lambda batch, mask: np.asarray(batch).mean(axis=1) ** power\n\n"
                    "def other():\n"
                    "    return lambda batch, mask: np.asarray(batch).max(axis=1)\n")
    by_file = sq.load_embedder(str(path))
    np.testing.assert_allclose(by_file(x, None), x.mean(axis=1))
    np.testing.assert_allclose(sq.load_embedder(f"{path}:make_embedder", power=2)(x, None), x.mean(axis=1) ** 2)
    np.testing.assert_allclose(sq.load_embedder(f"{path}:other")(x, None), x.max(axis=1))


def test_loader_errors_name_the_spec(tmp_path):
    with pytest.raises(ImportError, match="'no_such_package.embed:make'.*no_such_package"):
        sq.load_embedder("no_such_package.embed:make")
    missing = str(tmp_path / "missing.py")
    with pytest.raises(FileNotFoundError, match=f"'{missing}': no file {missing}"):
        sq.load_embedder(missing)
    with pytest.raises(AttributeError, match="'tests.eval.test_sequences:nope'.*has no 'nope'"):
        sq.load_embedder("tests.eval.test_sequences:nope")
    broken = tmp_path / "broken.py"
    broken.write_text("import numpy as np\nraise RuntimeError('no weights at /data/vggish')\n")
    with pytest.raises(ImportError, match=f"'{broken}': importing {broken} failed.*no weights at /data/vggish"):
        sq.load_embedder(str(broken))
    failing = tmp_path / "failing.py"
    failing.write_text("def make_embedder(checkpoint='x.pt'):\n    raise FileNotFoundError(checkpoint)\n"
                       "not_a_factory = 3\n\ndef returns_data():\n    return [1, 2]\n")
    with pytest.raises(RuntimeError, match=r"make_embedder\(checkpoint='c.pt'\) failed \(FileNotFoundError: c.pt\)"):
        sq.load_embedder(str(failing), checkpoint="c.pt")
    with pytest.raises(TypeError, match="not_a_factory.*is a int, not a factory"):
        sq.load_embedder(f"{failing}:not_a_factory")
    with pytest.raises(TypeError, match=f"'{failing}:returns_data'.*returned a list"):
        sq.load_embedder(f"{failing}:returns_data")
    with pytest.raises(RuntimeError, match="'mean_std'"):
        sq.load_embedder("mean_std", scale=2)
    with pytest.raises(ValueError, match="expected 'mean_std'"):
        sq.load_embedder("")


def test_too_few_sequences_fail_before_the_embedder_loads(tmp_path, monkeypatch, alarm):
    from lsync_jax.eval import sample_batch

    def refuse(*args, **kwargs):
        raise AssertionError("the embedder loaded before the counts were checked")

    monkeypatch.setattr(sample_batch, "load_embedder", refuse)
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "one.npz", arr_0=rng.normal(size=(1, 6, 3)).astype(np.float32))
    np.savez(tmp_path / "five.npz", arr_0=rng.normal(size=(5, 6, 3)).astype(np.float32))
    for sample, ref, match in (("one", "five", "the sample batch .*one.npz holds 1"),
                               ("five", "one", "the reference .*one.npz holds 1")):
        with alarm(60), pytest.raises(ValueError, match="a Frechet distance needs at least 2 sequences.*" + match):
            sample_batch.evaluate_sequences(str(tmp_path / f"{sample}.npz"), "mean_std",
                                            ref_batch=str(tmp_path / f"{ref}.npz"), log=lambda _: None)
