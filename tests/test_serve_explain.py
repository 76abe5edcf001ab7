"""`explain=1` on POST /api/v1/predict and the page's "explain" box: a heatmap of the pixels
that drove the top answer, bounded per request, absent unless asked for."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from PIL import Image
from synthetic import encode
from test_explain import CORNERS, cue_image, quadrant_share

from convnet.serve import create_app

URL = "/api/v1/predict"


def corner_png(corner=(0, 0), size=32) -> bytes:
    return encode(cue_image(size, corner, cue=size // 4))


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@pytest.mark.parametrize("corner", CORNERS.values(), ids=CORNERS.keys())
def test_the_heatmap_points_at_the_corner_with_the_cue(client, corner):
    """The tiny model answers airplane for red; the only red is in one corner."""
    response = client.post(f"{URL}?explain=1", data=corner_png(corner), content_type="image/png")
    assert response.status_code == 200, response.text
    prediction = response.get_json()["predictions"][0]
    found = prediction["explanation"]
    assert prediction["label"] == found["label"] == "airplane" and found["index"] == 0
    assert found["method"] == "occlusion" and found["grid"] == 8
    heatmap = np.array(found["heatmap"])
    assert heatmap.shape == (8, 8)
    assert quadrant_share(heatmap, corner) > 0.9
    overlay = np.asarray(Image.open(io.BytesIO(base64.b64decode(found["overlay_png"]))))
    assert overlay.shape == (32, 32, 3)  # the image the model saw, tinted
    quadrant = overlay[:16, :16] if corner == (0, 0) else None
    if quadrant is not None:
        assert quadrant[..., 0].mean() > overlay[16:, 16:, 0].mean()


def test_every_image_of_a_batch_is_explained_in_order(client):
    green = encode(np.full((32, 32, 3), (20, 230, 20), np.uint8))
    body = {"instances": [{"b64": b64(corner_png((1, 1)))}, {"b64": b64(green)}]}
    predictions = client.post(f"{URL}?explain=true", json=body).get_json()["predictions"]
    assert [p["explanation"]["label"] for p in predictions] == ["airplane", "automobile"]
    assert quadrant_share(np.array(predictions[0]["explanation"]["heatmap"]), (1, 1)) > 0.9


@pytest.mark.parametrize("query", ["", "?explain=0", "?explain=false", "?explain="])
def test_no_explanation_unless_asked(client, query, red_png):
    response = client.post(URL + query, data=red_png, content_type="image/png")
    assert response.status_code == 200
    assert "explanation" not in response.get_json()["predictions"][0]


def test_a_model_of_another_size_is_explained_at_its_size(model_root_64):
    client = create_app({"MODEL_DIR": str(model_root_64), "RELOAD_INTERVAL": 0}).test_client()
    response = client.post(f"{URL}?explain=1", data=corner_png((0, 1), size=200),
                           content_type="image/png")
    found = response.get_json()["predictions"][0]["explanation"]
    assert Image.open(io.BytesIO(base64.b64decode(found["overlay_png"]))).size == (64, 64)
    assert quadrant_share(np.array(found["heatmap"]), (0, 1)) > 0.9


@pytest.fixture
def limited(model_root):
    app = create_app({"MODEL_DIR": str(model_root), "RELOAD_INTERVAL": 0,
                      "MAX_EXPLAIN_IMAGES": 2})
    return app.test_client()


@pytest.mark.parametrize("count,status", [(2, 200), (3, 400)])
def test_explain_is_bounded_per_request(limited, red_png, count, status):
    body = {"instances": [{"b64": b64(red_png)}] * count}
    response = limited.post(f"{URL}?explain=1", json=body)
    assert response.status_code == status
    if status == 400:
        assert "at most 2 images" in response.get_json()["error"]
    assert limited.post(URL, json=body).status_code == 200  # without explain: no such limit


@pytest.mark.parametrize("value", ["2", "maybe", "yes please"])
def test_a_bad_explain_value_is_a_400(client, red_png, value):
    response = client.post(f"{URL}?explain={value}", data=red_png, content_type="image/png")
    assert response.status_code == 400
    assert "explain must be 1 or 0" in response.get_json()["error"]


def test_the_setting_comes_from_the_environment(model_root, monkeypatch):
    monkeypatch.setenv("CONVNET_MAX_EXPLAIN_IMAGES", "3")
    app = create_app({"MODEL_DIR": str(model_root), "RELOAD_INTERVAL": 0})
    assert app.config["MAX_EXPLAIN_IMAGES"] == 3


def test_the_page_without_javascript_explains_when_the_box_is_ticked(client):
    plain = client.post("/", data={"file": [(io.BytesIO(corner_png()), "cue.png")]})
    assert plain.status_code == 200 and 'class="explanation"' not in plain.text
    assert 'id="explain-input" name="explain"' in plain.text
    ticked = client.post("/", data={"file": [(io.BytesIO(corner_png()), "cue.png")],
                                    "explain": "1"})
    assert ticked.status_code == 200, ticked.text
    html = ticked.text
    assert html.count('class="explanation"') == 1
    assert "lowered &ldquo;airplane&rdquo; most" in html
    assert "checked" in html.split('id="explain-input"')[1].split(">")[0]


def test_the_page_refuses_too_many_images_to_explain(limited, red_png):
    files = [(io.BytesIO(red_png), f"{i}.png") for i in range(3)]
    response = limited.post("/", data={"file": files, "explain": "1"})
    assert response.status_code == 400
    assert "at most 2 images" in response.text and "<html" in response.text
