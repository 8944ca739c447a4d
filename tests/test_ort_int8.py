"""ONNX Runtime's signed-weight form of the int8 graphs (``ort_int8``): the same integers, a faster kernel."""

from __future__ import annotations

import os

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from owl_deploy import ort_int8
from owl_deploy.errors import OwlError

VNNI = ort_int8.enabled(env={})  # the CPU rule, whatever the environment says


def test_signed_is_the_same_integer_minus_the_zero_point():
    q = np.array([[0, 1, 127, 128], [129, 200, 254, 255]] * 2, dtype=np.uint8).reshape(4, 4)
    s = ort_int8.signed(np.tile(q, (1, 2)))  # 4x8
    assert s.dtype == np.int8 and s.shape == (4, 8)
    assert (s.astype(np.int32) == np.tile(q, (1, 2)).astype(np.int32) - 128).all()
    assert s[0, 3] == 0  # a pruned weight (stored 128) stays an exact zero
    with pytest.raises(OwlError, match="uint8"):
        ort_int8.signed(np.zeros((2, 2), np.int8))


@pytest.mark.parametrize(
    ("flags", "env", "expected"),
    [
        ({"avx2", "avx512f", "avx512_vnni"}, {}, True),
        ({"avx2", "avx_vnni"}, {}, True),
        ({"avx2", "avx512f", "amx_int8", "avx512_vnni"}, {}, True),
        ({"avx2", "fma"}, {}, False),  # MLAS sums uint8 x int8 pairs in saturating int16 there
        ({"avx2", "avx512f"}, {}, False),
        ({"avx2"}, {ort_int8.ENV: "1"}, True),
        ({"avx512_vnni"}, {ort_int8.ENV: "0"}, False),
        ({"avx512_vnni"}, {ort_int8.ENV: ""}, True),
    ],
)
def test_enabled_where_the_cpu_has_vnni_unless_told(flags, env, expected):
    assert ort_int8.enabled(flags, env) is expected


def test_a_bad_setting_is_one_line():
    with pytest.raises(OwlError, match="OWL_ORT_SIGNED_INT8 must be 0 or 1"):
        ort_int8.enabled({"avx512_vnni"}, {ort_int8.ENV: "yes"})


def _graph(rng, shared_elsewhere: bool = False, zp_b: int = 128):
    """y = MatMulInteger(x, W1, 128, zp_b) and MatMulInteger(x, W2, 128, zp_b) as float, plus (optionally) W2
    also read by an Identity node (so it must stay uint8)."""
    w1 = rng.integers(0, 256, (8, 6), dtype=np.uint8)
    w2 = rng.integers(0, 256, (8, 6), dtype=np.uint8)
    w1[:, 0] = 128  # a pruned column
    nodes = [
        helper.make_node("MatMulInteger", ["x", "W1", "zp", "zpb"], ["y1"]),
        helper.make_node("MatMulInteger", ["x", "W2", "zp", "zpb"], ["y2"]),
        helper.make_node("Cast", ["y1"], ["f1"], to=TensorProto.FLOAT),
        helper.make_node("Cast", ["y2"], ["f2"], to=TensorProto.FLOAT),
        helper.make_node("Add", ["f1", "f2"], ["y"]),
    ]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 6])]
    if shared_elsewhere:
        nodes.append(helper.make_node("Identity", ["W2"], ["w2_out"]))
        outputs.append(helper.make_tensor_value_info("w2_out", TensorProto.UINT8, [8, 6]))
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.UINT8, [4, 8])],
        outputs,
        [
            numpy_helper.from_array(w1, "W1"),
            numpy_helper.from_array(w2, "W2"),
            numpy_helper.from_array(np.array(128, np.uint8), "zp"),
            numpy_helper.from_array(np.array(zp_b, np.uint8), "zpb"),
        ],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _run(proto, x):
    import onnxruntime as ort

    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})


def test_sign_weights_rewrites_only_what_it_can_prove_the_same():
    rng = np.random.default_rng(0)
    proto = _graph(rng)
    assert ort_int8.sign_weights(proto) == 2
    inits = {t.name: t for t in proto.graph.initializer}
    assert inits["W1"].data_type == TensorProto.INT8 and inits["W2"].data_type == TensorProto.INT8
    assert (numpy_helper.to_array(inits["W1"])[:, 0] == 0).all()
    assert all(n.input[3] == ort_int8.SIGNED_ZERO_POINT for n in proto.graph.node if n.op_type == "MatMulInteger")
    assert numpy_helper.to_array(inits["zp"]) == 128  # the activations' zero point is untouched
    assert ort_int8.sign_weights(proto) == 0  # idempotent

    shared = _graph(np.random.default_rng(0), shared_elsewhere=True)
    assert ort_int8.sign_weights(shared) == 1  # W2 is also read by another node: left uint8
    assert {t.name: t for t in shared.graph.initializer}["W2"].data_type == TensorProto.UINT8
    other_zp = _graph(np.random.default_rng(0), zp_b=100)
    assert ort_int8.sign_weights(other_zp) == 0


@pytest.mark.skipif(not VNNI, reason="uint8 x int8 is exact in ONNX Runtime only with VNNI (this CPU has none)")
def test_signed_graph_gives_the_same_integers_at_the_extremes():
    """Activations and weights at 0 and 255 (the int16 pair sums that would saturate without VNNI)."""
    rng = np.random.default_rng(1)
    proto = _graph(rng)
    for t in proto.graph.initializer:
        if t.name in ("W1", "W2"):
            w = numpy_helper.to_array(t).copy()
            w[::2] = 255
            w[1::2] = 0
            t.CopyFrom(numpy_helper.from_array(w, t.name))
    x = np.full((4, 8), 255, np.uint8)
    x[1] = 0
    x[2] = rng.integers(0, 256, 8, dtype=np.uint8)
    want = _run(proto, x)[0]
    w = {t.name: numpy_helper.to_array(t).astype(np.int64) - 128 for t in proto.graph.initializer if t.name[0] == "W"}
    assert np.array_equal(want, ((x.astype(np.int64) - 128) @ (w["W1"] + w["W2"])).astype(np.float32))
    ort_int8.sign_weights(proto)
    got = _run(proto, x)[0]
    assert np.array_equal(got, want)


def _external_graph(folder):
    """The test graph saved with its weights in a side file (as the export stores a graph past 1.8 GB) and its
    one-byte zero points inline (once per folder: onnx appends to an existing side file); returns the graph as
    the runtime reads it (without the weights)."""
    import onnx

    if not (folder / "model.onnx").exists():
        onnx.save_model(
            _graph(np.random.default_rng(2)),
            str(folder / "model.onnx"),
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location="model.data",
            size_threshold=40,
        )  # fmt: skip  (onnx counts a tensor's size with Python's 33-byte bytes header: zero points stay inline)
    return onnx.load(str(folder / "model.onnx"), load_external_data=False)


def _run_from(folder, proto, x):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.add_session_config_entry("session.model_external_initializers_file_folder_path", str(folder))
    sess = ort.InferenceSession(proto.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})[0]


def test_weights_stored_outside_the_graph_need_their_folder(tmp_path):
    """Without the deployment folder there is nowhere to put re-signed external weights: they stay uint8."""
    proto = _external_graph(tmp_path)
    assert ort_int8.sign_weights(proto) == 0
    assert all(t.data_type == TensorProto.UINT8 for t in proto.graph.initializer)
    assert not (tmp_path / ort_int8.COMPANION).exists()


def test_weights_stored_outside_the_graph_are_read_re_signed_from_a_companion_file(tmp_path):
    import onnx

    x = np.random.default_rng(3).integers(0, 256, (4, 8), dtype=np.uint8)
    want = _run_from(tmp_path, _external_graph(tmp_path), x)
    data = (tmp_path / "model.data").read_bytes()
    proto = _external_graph(tmp_path)
    assert ort_int8.sign_weights(proto, tmp_path) == 2
    assert (tmp_path / "model.data").read_bytes() == data  # the deployment's own weights never change
    full = onnx.load(str(tmp_path / "model.onnx"))
    for t in proto.graph.initializer:
        if t.name in ("W1", "W2"):
            info = {e.key: e.value for e in t.external_data}
            assert t.data_type == TensorProto.INT8 and info["location"] == ort_int8.COMPANION
            assert int(info["offset"]) % ort_int8.ALIGN == 0
            raw = (tmp_path / ort_int8.COMPANION).read_bytes()[int(info["offset"]) :][: int(info["length"])]
            orig = numpy_helper.to_array({i.name: i for i in full.graph.initializer}[t.name])
            assert np.array_equal(np.frombuffer(raw, np.int8).reshape(orig.shape), ort_int8.signed(orig))
    if VNNI:  # uint8 x int8 is exact in ONNX Runtime only with VNNI
        assert np.array_equal(_run_from(tmp_path, proto, x), want)

    stamp = (tmp_path / ort_int8.COMPANION).stat().st_mtime_ns
    assert ort_int8.sign_weights(_external_graph(tmp_path), tmp_path) == 2
    assert (tmp_path / ort_int8.COMPANION).stat().st_mtime_ns == stamp  # reused, not written again
    st = (tmp_path / "model.data").stat()
    os.utime(tmp_path / "model.data", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # as a re-export would
    assert ort_int8.sign_weights(_external_graph(tmp_path), tmp_path) == 2
    assert (tmp_path / ort_int8.COMPANION).stat().st_mtime_ns != stamp  # rebuilt from the new weights
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["model.onnx", "model.data", ort_int8.COMPANION, ort_int8.COMPANION_INDEX]
    )


def test_an_unwritable_companion_leaves_the_external_weights_as_exported(tmp_path, caplog):
    (tmp_path / ort_int8.COMPANION).mkdir()  # a directory in its place: the file cannot be written there
    proto = _external_graph(tmp_path)
    assert ort_int8.sign_weights(proto, tmp_path) == 0
    assert all(t.data_type == TensorProto.UINT8 for t in proto.graph.initializer)
    assert "cannot write" in caplog.text
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no half-written file left


def test_a_second_opener_waits_for_the_companion_being_written_and_reads_it(tmp_path):
    """Two first-time sessions of one deployment write the 1.5 GB file once: the second waits on the folder's lock
    and, finding the file current when it gets the lock, reads it instead of writing its own."""
    import threading

    from owl_deploy.io import waiting

    tensors = [t for t in _external_graph(tmp_path).graph.initializer if t.name in ("W1", "W2")]
    placed = ort_int8.companion(tmp_path, tensors)
    index = tmp_path / ort_int8.COMPANION_INDEX
    good, inode = index.read_text(), (tmp_path / ort_int8.COMPANION).stat().st_ino
    index.write_text("{}")  # stale: a first-time opener must (re)write the companion
    got = []
    with waiting(tmp_path):  # another process is writing it
        opener = threading.Thread(target=lambda: got.append(ort_int8.companion(tmp_path, tensors)))
        opener.start()
        opener.join(0.5)
        assert opener.is_alive() and not got  # waits instead of writing beside the other writer
        index.write_text(good)  # the other writer finishes
    opener.join(10)
    assert got == [placed]
    assert (tmp_path / ort_int8.COMPANION).stat().st_ino == inode  # read, not written a second time
