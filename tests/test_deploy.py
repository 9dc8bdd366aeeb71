"""From a trained run to artifacts and predictions: vitblocks.export, vitblocks.predict, decoders, refusals."""

import csv
import json

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from sklearn.datasets import load_digits

from vitblocks import export, predict
from vitblocks.deploy import DeployError, find_artifact, load_source
from vitblocks.deploy import formats as deploy_formats
from vitblocks.deploy import int8 as deploy_int8
from vitblocks.deploy.formats import check_exportable
from vitblocks.deploy.preprocess import check_preprocessing, preprocess
from vitblocks.train import Trainer, derive, load_recipe
from vitblocks.train.data.decoders import DECODERS, image_decoder, torchcodec_available


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """The quickstart's model trained two epochs on the digits (a few seconds; one leaves near-ties int8 flips)."""
    folder = tmp_path_factory.mktemp("deploy") / "run"
    config = derive(load_recipe("recipes/quickstart.py"), epochs=2, output_dir=str(folder))
    Trainer(config).fit(progress=False)
    return folder


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """24 digits as image files (PNG and JPEG, one in a subfolder), a broken file, and their labels."""
    folder = tmp_path_factory.mktemp("photos")
    (folder / "more").mkdir()
    digits = load_digits()
    labels = {}
    for i in range(24):
        pixels = (digits.images[-1 - i] / 16 * 255).astype(np.uint8)
        path = folder / ("more" if i == 0 else "") / f"digit{i:02d}.{'png' if i % 2 else 'jpg'}"
        Image.fromarray(pixels).resize((40, 40)).convert("RGB").save(path, quality=95)
        labels[path] = int(digits.target[-1 - i])
    (folder / "broken.png").write_bytes(b"not an image")
    return folder, labels


def read_csv(path):
    with open(path) as handle:
        rows = list(csv.reader(handle))
    return rows[0], {row[0]: row[1:] for row in rows[1:]}


@pytest.mark.slow  # compiles two AOTInductor packages
def test_a_run_exports_to_every_format_and_each_predicts_like_eager(run, photos, tmp_path, capsys):
    folder, labels = photos
    assert predict.main([str(run), str(folder), str(tmp_path / "absent.png"), "--topk", "3",
                         "--out", str(tmp_path / "eager.csv")]) == 2  # the broken file and the absent one
    err = capsys.readouterr().err
    assert "skipped" in err and "broken.png" in err and "absent.png: no such file or folder" in err
    header, eager = read_csv(tmp_path / "eager.csv")
    assert header == ["path", "top1", "top1_probability", "top2", "top2_probability", "top3", "top3_probability"]
    assert set(eager) == {str(p) for p in labels}
    accuracy = np.mean([eager[str(p)][0] == str(label) for p, label in labels.items()])
    assert accuracy > 0.5  # two epochs: the model reads the digits, the class names are the run's

    for fmt, batch in (("onnx", "dynamic"), ("pt2", "dynamic"), ("int8", "dynamic")):
        assert export.main([str(run), "--format", fmt, "--batch", batch, "--check-images", "200",
                            "--calibration-images", "128"]) == 0
        out = capsys.readouterr().out
        artifact = run / "export" / deploy_formats.FORMATS[fmt]
        manifest = json.loads((run / "export" / (artifact.name + ".json")).read_text())
        assert f"as {fmt}: {artifact}" in out and "top-1 agreement" in out
        assert manifest["format"] == fmt and manifest["model"] == "sret_t" and manifest["input_size"] == [3, 32, 32]
        assert manifest["classes"] == [str(i) for i in range(10)] and manifest["mean"] == [0.5, 0.5, 0.5]
        assert manifest["check"]["images"] == 200 and "validation split" in manifest["check"]["data"]
        assert manifest["versions"]["torch"] == torch.__version__
        if fmt == "int8":
            assert manifest["check"]["top1_agreement"] >= 0.99 and manifest["calibration"]["images"] == 128
        else:
            assert manifest["check"]["max_abs_logit_diff"] < 1e-4 and manifest["check"]["top1_agreement"] == 1.0

        assert predict.main([str(artifact), str(folder), "--topk", "3", "--out", str(tmp_path / f"{fmt}.csv")]) == 1
        assert f"{artifact} ({fmt}, sret_t)" in capsys.readouterr().out
        _, got = read_csv(tmp_path / f"{fmt}.csv")
        agree = np.mean([got[p][0] == eager[p][0] for p in eager])
        if fmt == "int8":
            assert agree >= 0.95  # 24 images: at most one differs
        else:
            assert agree == 1.0
            assert max(abs(float(got[p][1]) - float(eager[p][1])) for p in eager) < 1e-4

    with pytest.raises(DeployError, match=r"holds 3 exports \(model.onnx, model.pt2, model_int8.pt2\): name one"):
        find_artifact(run / "export")
    assert predict.main([str(run / "export" / "model.onnx"), str(next(iter(labels))), "--out",
                         str(tmp_path / "one.json")]) == 0
    record = json.loads((tmp_path / "one.json").read_text())
    first = str(next(iter(labels)))
    assert record[0]["path"] == first and len(record[0]["top"]) == 5
    probabilities = [entry["probability"] for entry in record[0]["top"]]
    assert probabilities == sorted(probabilities, reverse=True)
    assert record[0]["top"][0]["class"] == eager[first][0]
    assert abs(probabilities[0] - float(eager[first][1])) < 1e-4


def test_a_fixed_batch_export_cuts_and_pads_other_batches(run, tmp_path, capsys, monkeypatch):
    assert export.main([str(run), "--format", "onnx", "--batch", "4", "--output", str(tmp_path),
                        "--check-images", "10"]) == 0
    manifest = json.loads((tmp_path / "model.onnx.json").read_text())
    assert manifest["batch"] == 4 and manifest["check"]["images"] == 10  # 10 images: 4 + 4 + 2 padded
    assert manifest["check"]["max_abs_logit_diff"] < 1e-4
    model = load_source(run).model
    artifact = deploy_formats.load_artifact(tmp_path / "model.onnx", "onnx", batch=4)
    images = torch.randn(7, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(artifact(images), model(images), atol=1e-4, rtol=1e-4)
    capsys.readouterr()

    def unrunnable(*args, **kwargs):
        raise RuntimeError("the runtime lacks a kernel")

    monkeypatch.setattr(export, "load_artifact", unrunnable)  # written, then fails its check
    assert export.main([str(run), "--format", "onnx", "--output", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "the onnx artifact was written but does not run (RuntimeError: the runtime lacks a kernel)" in err
    assert not (tmp_path / "model.onnx").exists() and not (tmp_path / "model.onnx.json").exists()  # nothing stale


def test_int8_with_a_fixed_batch_calibrates_in_that_batch(run):
    model = load_source(run).model
    calibration = [torch.randn(5, 3, 32, 32), torch.randn(6, 3, 32, 32)]  # 11 images: 4 + 4 + 3 padded
    program = deploy_int8.quantize_int8(model, torch.randn(4, 3, 32, 32), None, calibration)
    images = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert (program.module()(images) - model(images)).abs().max() < 0.5  # int8 steps, not another model
    assert [len(b) for b in deploy_int8.in_batches_of(calibration, 4)] == [4, 4, 4]


def test_each_use_of_a_shared_int8_weight_gets_its_own_copy(run):
    """Inductor packs an int8 weight into oneDNN's kernel only when one linear layer uses it: a recursive
    block's loops must not share one (they fell back to float matrix products, slower than float)."""
    model = load_source(run).model
    x86, prepare_pt2e, convert_pt2e = deploy_int8._quantization_api()
    quantizer = x86.X86InductorQuantizer().set_global(x86.get_default_x86_inductor_quantization_config())
    images = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        prepared = prepare_pt2e(torch.export.export(model, (images,)).module(), quantizer)
        prepared(images)
        converted = convert_pt2e(prepared)
        before = converted(images)

        def shared():
            return [n for n in converted.graph.nodes if n.op == "get_attr" and len(n.users) > 1
                    and deploy_int8.functools.reduce(getattr, n.target.split("."), converted).dtype == torch.int8]

        assert len(shared()) > 0  # the quickstart SReT loops its blocks
        assert deploy_int8.unshare_quantized_weights(converted) > 0
        assert shared() == [] and deploy_int8.unshare_quantized_weights(converted) == 0
        torch.testing.assert_close(converted(images), before, atol=0, rtol=0)


def test_export_refuses_what_it_cannot_do_before_writing(run, tmp_path, capsys, monkeypatch):
    def refused(args, *fragments):
        assert export.main(args) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1, err
        for fragment in fragments:
            assert fragment in err, (fragment, err)

    (tmp_path / "empty").mkdir()
    refused([str(tmp_path / "empty"), "--format", "onnx"], "holds no checkpoint (best.pth or last.pth)")
    refused([str(tmp_path / "nothing"), "--format", "onnx"], "is not a run folder, a checkpoint file or a registered")
    refused([str(run), "--format", "onnx", "--img-size", "64"], "trained at 32 px")
    refused([str(run), "--format", "onnx", "--ema"], "holds no EMA weights")
    refused([str(run), "--format", "int8", "--calibration", str(tmp_path / "empty")], "holds no image that can be")
    monkeypatch.setattr(deploy_int8.platform, "machine", lambda: "aarch64")
    refused([str(run), "--format", "int8"], "int8 targets x86 CPUs", "export --format pt2 or onnx")
    monkeypatch.undo()

    def no_torchao():
        raise ImportError("No module named 'torchao'")

    monkeypatch.setattr(deploy_int8, "_quantization_api", no_torchao)
    refused([str(run), "--format", "int8"], "int8 needs torchao", "pip install 'vitblocks[export]'")
    monkeypatch.undo()

    def broken_exporter(*args, **kwargs):
        raise RuntimeError("an operator the exporter does not know")

    monkeypatch.setattr(torch.onnx, "export", broken_exporter)
    refused([str(run), "--format", "onnx", "--output", str(tmp_path / "out")],
            "cannot be exported as onnx: RuntimeError: an operator the exporter does not know. Try --format pt2")
    assert not (tmp_path / "out" / "model.onnx").exists() and not list((tmp_path / "out").glob(".*"))
    assert not (tmp_path / "empty" / "export").exists()

    with pytest.raises(SystemExit):
        export.main([str(run), "--format", "tflite"])
    assert "invalid choice: 'tflite'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        export.main([str(run), "--format", "onnx", "--batch", "0"])
    assert "a batch size must be >= 1" in capsys.readouterr().err

    with pytest.raises(DeployError, match="unknown format 'tflite'"):
        check_exportable(torch.nn.Linear(2, 2), "tflite")
    exiting = timm.create_model("sret_t", img_size=32, early_exit={"threshold": 0.9})
    with pytest.raises(DeployError, match="stops confident images early .* --exit-threshold 2"):
        check_exportable(exiting, "pt2")
    exiting_full = timm.create_model("sret_t", img_size=32, early_exit={"threshold": 2.0})
    check_exportable(exiting_full, "onnx")  # above 1 no image stops: the static model


def test_predict_refuses_and_counts_what_it_cannot_read(run, photos, tmp_path, capsys):
    folder, _ = photos

    def failed(args, *fragments):
        assert predict.main(args) == predict.FAILED
        err = capsys.readouterr().err
        for fragment in fragments:
            assert fragment in err, (fragment, err)

    failed([str(run), str(folder), "--out", str(tmp_path / "p.txt")], "write predictions to a .csv or .json file")
    failed([str(run), str(folder), "--topk", "11"], "--topk must be between 1 and the model's 10 classes")
    failed([str(run), str(tmp_path / "none*.png"), str(tmp_path)],
           "no image files found", "a pattern that matches no image file", "a folder without image files")
    failed([str(tmp_path / "nothing"), str(folder)], "is not a run folder, a checkpoint file or a registered")
    (tmp_path / "bare.onnx").write_bytes(b"")
    failed([str(tmp_path / "bare.onnx"), str(folder)], "has no manifest beside it (bare.onnx.json)")
    (tmp_path / "looks.csv").mkdir()
    failed([str(run), str(folder), "--out", str(tmp_path / "looks.csv")], "is a folder: name a file in it")
    failed([str(run), str(folder), "--out", str(tmp_path / "nowhere" / "p.csv")], "does not exist; create it first")
    failed([str(run), str(folder), "--batch-size", "0"], "--batch-size must be between 1 and 1024")
    assert export.main([str(run), "--format", "onnx", "--output", str(tmp_path / "onnx"), "--check-images", "2"]) == 0
    artifact = tmp_path / "onnx" / "model.onnx"
    failed([str(artifact), str(folder), "--ema"], "holds the weights it was exported with")
    manifest = json.loads((tmp_path / "onnx" / "model.onnx.json").read_text())
    for damage, fragment in (({"batch": 0}, "batch 0 is neither"), ({"format": ["onnx"]}, "format ['onnx']"),
                             ({"input_size": [3, 32]}, "input_size must be"), ({"mean": [0.5]}, "mean must be 3"),
                             ({"classes": "0123456789"}, "classes must be a list"),
                             ({"interpolation": "magic"}, "interpolation 'magic'")):
        (tmp_path / "onnx" / "model.onnx.json").write_text(json.dumps({**manifest, **damage}))
        failed([str(artifact), str(folder)], "is damaged (", fragment, "export the model again")
    (tmp_path / "onnx" / "model.onnx.json").write_text("{not json")
    failed([str(artifact), str(folder)], "cannot be read")
    (tmp_path / "onnx" / "model.onnx.json").write_text(json.dumps({**manifest, "classes": ["a", "b"]}))
    failed([str(artifact), str(folder), "--topk", "1"], "gives 10 logits per image but names 2 classes")
    with pytest.raises(SystemExit) as stopped:
        predict.main([str(run)])  # no images: a usage error, not "2 unreadable images"
    assert stopped.value.code == predict.FAILED
    capsys.readouterr()

    assert predict.main([str(run), str(folder / "*.png"), "--topk", "1"]) == 1  # the broken one
    captured = capsys.readouterr()
    assert "1 of 13 images could not be read" in captured.err  # 12 digits and the broken file
    assert f"skipped {folder / 'broken.png'}: " in captured.err and "If you know" not in captured.err
    assert len([line for line in captured.out.splitlines() if line.startswith(str(folder))]) == 12


@pytest.mark.parametrize("decoder", DECODERS)
def test_each_decoder_gives_one_rgb_uint8_frame_of_any_image_file(decoder, tmp_path, monkeypatch):
    if decoder == "torchcodec" and not torchcodec_available():
        pytest.skip("torchcodec is not installed here")  # the train extra installs it: CI runs both
    chosen = image_decoder(decoder)
    gray = (np.arange(12 * 20).reshape(12, 20) % 256).astype(np.uint8)
    files = {
        "gray.png": Image.fromarray(gray),
        "rgba.png": Image.fromarray(np.dstack([gray] * 4)),
        "deep.png": Image.fromarray(gray.astype(np.uint16) * 257),  # 16 bits per pixel
        "cmyk.jpg": Image.fromarray(np.dstack([gray] * 3)).convert("CMYK"),
    }
    for name, image in files.items():
        image.save(tmp_path / name, quality=95)
    frames = [Image.fromarray(np.dstack([gray] * 3)), Image.fromarray(np.dstack([255 - gray] * 3))]
    frames[0].save(tmp_path / "moving.gif", save_all=True, append_images=frames[1:])
    for name in [*files, "moving.gif"]:
        image = chosen.decode(torch.frombuffer(bytearray((tmp_path / name).read_bytes()), dtype=torch.uint8))
        assert image.shape == (3, 12, 20) and image.dtype == torch.uint8, name
        if name != "cmyk.jpg":  # JPEG and CMYK conversions round
            expected = torch.from_numpy(gray).expand(3, -1, -1)
            assert (image.int() - expected.int()).abs().max() <= (2 if name == "moving.gif" else 0), name


@pytest.mark.parametrize("decoder", DECODERS)
def test_each_decoder_reads_png_and_jpeg_and_refuses_other_bytes(decoder, tmp_path, monkeypatch):
    if decoder == "torchcodec" and not torchcodec_available():
        pytest.skip("torchcodec is not installed here")  # the train extra installs it: CI runs both
    monkeypatch.setenv("VITBLOCKS_DECODER", decoder)
    chosen = image_decoder()
    assert chosen.name == decoder
    pixels = (np.random.default_rng(0).random((12, 20, 3)) * 255).astype(np.uint8)
    for suffix in ("png", "jpg"):
        Image.fromarray(pixels).save(tmp_path / f"a.{suffix}", quality=95)
        image = chosen.decode(torch.frombuffer(bytearray((tmp_path / f"a.{suffix}").read_bytes()), dtype=torch.uint8))
        assert image.shape == (3, 12, 20) and image.dtype == torch.uint8
        if suffix == "png":
            assert torch.equal(image, torch.from_numpy(pixels).permute(2, 0, 1))
    with pytest.raises(Exception):  # noqa: B017 - each library raises its own type for bytes it cannot read
        chosen.decode(torch.frombuffer(bytearray(b"not an image"), dtype=torch.uint8))
    monkeypatch.setenv("VITBLOCKS_DECODER", "pil")
    with pytest.raises(ValueError, match="image decoder 'pil' is not one of torchcodec, torchvision"):
        image_decoder()


@pytest.mark.parametrize("crop_mode, input_size", [("center", (3, 32, 32)), ("squash", (3, 32, 32)),
                                                    ("center", (3, 24, 40))])
def test_preprocessing_matches_timms_evaluation_transform(crop_mode, input_size):
    y, x = np.mgrid[0:48, 0:64]
    smooth = np.stack([128 + 100 * np.sin(x / 9), 128 + 100 * np.cos(y / 7), (x + y) * 2], -1).astype(np.uint8)
    config = {"input_size": input_size, "mean": (0.5, 0.4, 0.3), "std": (0.2, 0.25, 0.3), "crop_pct": 0.875,
              "crop_mode": crop_mode, "interpolation": "bicubic"}
    ours = preprocess(torch.from_numpy(smooth).permute(2, 0, 1), config)
    reference = timm.data.create_transform(**{k: v for k, v in config.items()})(Image.fromarray(smooth))
    steps = (ours - reference) * torch.tensor(config["std"]).view(3, 1, 1) * 255
    assert ours.shape == reference.shape == input_size
    assert steps.abs().mean() < 1.0 and steps.abs().max() < 8  # resamplers differ by about a pixel step


def test_preprocessing_refuses_what_it_cannot_reproduce():
    config = {"input_size": (3, 32, 32), "mean": (0.5,) * 3, "std": (0.5,) * 3, "crop_pct": 0.875}
    check_preprocessing(config)
    with pytest.raises(DeployError, match="crop_mode 'border' is not reproduced here"):
        check_preprocessing({**config, "crop_mode": "border"})
    with pytest.raises(DeployError, match="interpolation 'magic' is not one of bicubic"):
        check_preprocessing({**config, "interpolation": "magic"})


def test_the_run_folder_describes_the_preprocessing_the_digits_were_trained_with(run):
    """timm's own transform, built from the run folder's config.json, feeds the model what training fed it."""
    from vitblocks.train.data.datasets import build_dataset

    config = load_source(run).config
    model = timm.create_model(f"local-dir:{run}", pretrained=True).eval()
    data_config = timm.data.resolve_data_config(model=model)
    assert (data_config["interpolation"], data_config["crop_pct"]) == ("bilinear", 1.0)
    transform = timm.data.create_transform(**data_config)
    digits = load_digits()
    order = torch.randperm(len(digits.target), generator=torch.Generator().manual_seed(config.seed))
    val = order[:int(round(len(digits.target) * config.data.val_fraction))]
    trained, labels = build_dataset(config, train=False).tensors
    assert torch.equal(labels, torch.as_tensor(digits.target[val]))  # the same images, in the same order
    files = torch.stack([transform(Image.fromarray((digits.images[i] / 16 * 255).round().astype(np.uint8))
                                   .convert("RGB")) for i in val.tolist()])
    assert (files - trained).abs().mean() < 0.02  # PIL's resize of 8-bit files against the trainer's of the floats
    with torch.no_grad():
        from_files, from_training = model(files).argmax(-1), model(trained).argmax(-1)
    assert (from_files == from_training).float().mean() >= 0.98
    assert abs((from_files == labels).float().mean() - (from_training == labels).float().mean()) <= 0.01


def test_eval_names_the_data_split_and_image_count_it_scored(run, capsys):
    from vitblocks import eval as evaluation

    assert evaluation.main([str(run / "best.pth")]) == 0
    out = capsys.readouterr().out
    assert "scoring sret_t on 359 images: the validation split (20%) of scikit-learn's digits" in out
    assert "top-1 " in out.splitlines()[-1]


def test_summary_takes_a_run_folder(run, tmp_path, capsys):
    from vitblocks import summary

    params = sum(p.numel() for p in load_source(run).model.parameters())
    for spec in (str(run), f"local-dir:{run}"):
        summary.main([spec])
        out = capsys.readouterr().out
        total = next(line for line in out.splitlines() if line.startswith("total"))
        assert f"local-dir:{run} @ 32x32" in out and total.split()[1] == f"{params:,}", out
    with pytest.raises(SystemExit, match="holds no config.json: give a run folder the trainer wrote"):
        summary.main([str(tmp_path)])


def test_the_check_passes_over_only_the_runs_own_calibration_images(run, photos, tmp_path, monkeypatch):
    """Calibrated on the run's split, the check takes the images after those; on a folder, the split from its start."""
    def written(model, fmt, path, *args, **kwargs):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"")
        return path

    monkeypatch.setattr(export, "export_model", written)  # the check's choice of images, not the compile
    monkeypatch.setattr(export, "load_artifact", lambda *args, **kwargs: load_source(run).model)
    own = export.run(str(run), "int8", str(tmp_path / "own"), check_images=359)
    folder = export.run(str(run), "int8", str(tmp_path / "folder"), check_images=359, calibration_folder=str(photos[0]))
    assert own["check"]["data"].endswith("overlapping the calibration images: the split holds 359")
    assert folder["check"]["data"] == "the run's validation split (digits)" and folder["check"]["images"] == 359
    assert folder["calibration"]["images"] == 24 and own["calibration"]["images"] == 256
