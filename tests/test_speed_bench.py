"""bench/speed.py's pipeline mode: it writes its own JPEG test set, measures the ceilings and the pipeline, and its
stage breakdown puts each recipe's time where the recipe does the work."""

import json

import speed

import common


def run(capsys, *argv):
    speed.main(list(argv))
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_pipeline_report_has_the_ceilings_and_a_breakdown_where_the_work_is(tmp_path, capsys):
    from PIL import Image

    images = common.SyntheticTextures(12, 48, seed=0)
    for i in range(len(images)):
        Image.fromarray(images[i][0].permute(1, 2, 0).numpy()).save(tmp_path / f"{i}.png")
    argv = ["--data", str(tmp_path), "--make-jpegs", 8, "--side", 80, "--n", 8, "--batch", 4, "--rounds", 1]
    rows = {}
    for recipe in ("dino", "mae"):
        report = run(capsys, *map(str, argv), "--recipe", recipe, "--img-size", "64", "--local-crops", "2")
        assert report["jpegs"] == "80x80 q90" and report["images"] == 8 and report["cores"] == 1
        (rows[recipe],) = report["recipes"]
    assert rows["dino"]["views"] == [64, 64, 28, 28] and rows["mae"]["views"] == [64]
    # the ceilings bound the pipeline: decoding alone is faster than decoding and cropping, and DINO's colour and
    # blur make its whole pipeline several times slower than that
    dino_speeds = [rows["dino"][f"{side}_img_per_s"] for side in ("decode", "decode_crops", "ours")]
    assert dino_speeds == sorted(dino_speeds, reverse=True) and dino_speeds[-1] > 0
    for row in rows.values():
        assert row["decode_img_per_s"] > row["decode_crops_img_per_s"] > 0
        assert row["share_of_decode"] == round(row["ours_img_per_s"] / row["decode_img_per_s"], 2)
        stages = row["ms_per_image_by_stage"]
        assert list(stages) == [*speed.STAGES, "collate"] and all(v >= 0 for v in stages.values())
        assert stages["decode_image"] > 0 and stages["cut_crops"] > 0
    dino, mae = rows["dino"]["ms_per_image_by_stage"], rows["mae"]["ms_per_image_by_stage"]
    # DINO's recipe jitters, blurs and solarizes; MAE's has no colour at all
    assert all(dino[op] > 0 for op in ("brightness", "contrast", "saturation", "hue", "random_blur"))
    assert all(mae[op] == 0 for op in ("brightness", "contrast", "saturation", "hue"))
    # the stage timers are removed again: common's functions are the originals
    assert common.color_op.__name__ == "color_op" and not hasattr(common.cut_crops, "__wrapped__")
