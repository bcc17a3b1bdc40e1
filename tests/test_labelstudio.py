"""Label configs, smart-tool contexts and regions, against bodies captured from Label Studio 1.23.2."""

import copy

import pytest
from label_studio_sdk.label_interface import LabelInterface

from backend.errors import ServiceError
from backend.labelstudio import brush_region, parse_config, polygon_region, prediction, prompt_from_context

BRUSH_ONLY = """<View><Image name="img" value="$photo"/>
<BrushLabels name="mask" toName="img"><Label value="Dog"/></BrushLabels>
<KeyPointLabels name="kp" toName="img" smart="true"><Label value="Dog" smart="true"/></KeyPointLabels>
</View>"""

PREDICTED_VALUES = """<View><Image name="image" value="$image"/>
<PolygonLabels name="poly" toName="image">
  <Label value="Vehicle" predicted_values="car,truck, bus"/><Label value="Person"/><Label value="Cat"/>
</PolygonLabels></View>"""


def test_polygon_control_is_preferred_over_brush(ls_request):
    config = parse_config(ls_request("predict-batch")["label_config"])
    output = config.output_for("image")
    assert (output.name, output.type, output.labels) == ("polygon", "PolygonLabels", ("person", "dog", "car"))


def test_brush_control_is_used_when_there_is_no_polygon_control():
    output = parse_config(BRUSH_ONLY).output_for("img")
    assert (output.name, output.result_type) == ("mask", "brushlabels")


def test_predicted_values_map_several_model_classes_onto_one_label_then_names_match_case_insensitively():
    mapping = parse_config(PREDICTED_VALUES).output_for("image").class_to_label
    assert mapping["car"] == mapping["truck"] == mapping["bus"] == "Vehicle"
    assert mapping["person"] == "Person" and mapping["cat"] == "Cat"
    assert "dog" not in mapping


def test_image_url_comes_from_the_data_key_of_the_image_object():
    config = parse_config(BRUSH_ONLY)
    assert (
        config.image_url({"id": 1, "data": {"photo": "/data/upload/1/a.jpg"}}, "img")
        == "/data/upload/1/a.jpg"
    )
    with pytest.raises(ServiceError, match="data\\['photo'\\]"):
        config.image_url({"id": 1, "data": {"image": "x"}}, "img")


def test_positive_and_negative_keypoints_become_one_prompt(ls_request):
    body = ls_request("predict-interactive-keypoint-with-negative")
    prompt = prompt_from_context(body["params"]["context"], parse_config(body["label_config"]))
    assert prompt.to_name == "image" and prompt.label == "person"
    assert prompt.positive == (True, False)
    assert prompt.points[0] == pytest.approx((52.8988, 49.2599), abs=1e-3)
    assert prompt.box is None


def test_smart_rectangle_becomes_a_percent_box(ls_request):
    body = ls_request("predict-interactive-rectangle")
    prompt = prompt_from_context(body["params"]["context"], parse_config(body["label_config"]))
    assert prompt.box == pytest.approx((15.6, 16.7, 15.6 + 46.9, 16.7 + 62.5))
    assert prompt.points == () and prompt.label == "dog"


def test_a_rotated_rectangle_on_a_non_square_image_gives_the_box_around_it_in_pixels(ls_request):
    body = ls_request("predict-interactive-rectangle")
    item = body["params"]["context"]["result"][0]
    assert (item["original_width"], item["original_height"]) == (64, 48)
    item["value"].update(x=10, y=10, width=20, height=10, rotation=90)
    prompt = prompt_from_context(body["params"]["context"], parse_config(body["label_config"]))
    # 12.8 x 4.8 px at (6.4, 4.8) px, turned a quarter clockwise about that corner: x 1.6..6.4, y 4.8..17.6 px
    # (rotating the percent numbers instead would give 0..10 %, 10..30 %).
    assert prompt.box == pytest.approx((2.5, 10.0, 10.0, 17.6 / 48 * 100))


def test_a_rotated_rectangle_without_the_image_size_is_a_400(ls_request):
    body = ls_request("predict-interactive-rectangle")
    item = body["params"]["context"]["result"][0]
    item["value"]["rotation"] = 30
    del item["original_width"]
    with pytest.raises(ServiceError, match=r"params\.context\.result\[0\]\.original_width") as err:
        prompt_from_context(body["params"]["context"], parse_config(body["label_config"]))
    assert (err.value.status, err.value.kind) == (400, "bad_context")


@pytest.mark.parametrize("rotation", [float("nan"), float("inf"), float("-inf"), "abc", [1], True, 10**400])
def test_a_rotation_that_is_not_a_finite_number_is_a_400_naming_the_field(ls_request, rotation):
    body = ls_request("predict-interactive-rectangle")
    body["params"]["context"]["result"][0]["value"]["rotation"] = rotation
    with pytest.raises(ServiceError, match=r"params\.context\.result\[0\]\.value\.rotation") as err:
        prompt_from_context(body["params"]["context"], parse_config(body["label_config"]))
    assert (err.value.status, err.value.kind) == (400, "bad_context")


@pytest.mark.parametrize(
    "context, message",
    [
        ("points", "must be an object"),
        ({"result": "x"}, "must be an object"),
        ({"result": [{"type": "choices", "value": {}}]}, "no smart keypoint"),
        (
            {"result": [{"type": "keypointlabels", "value": [], "to_name": "image"}]},
            "value must be an object",
        ),
        (
            {
                "result": [
                    {
                        "type": "keypointlabels",
                        "to_name": "image",
                        "value": {"x": 5, "keypointlabels": ["dog"]},
                    }
                ]
            },
            "value.y",
        ),
        (
            {
                "result": [
                    {
                        "type": "keypointlabels",
                        "to_name": "image",
                        "value": {"x": 5, "y": 1e9, "labels": ["dog"]},
                    }
                ]
            },
            "value.y",
        ),
        (
            {
                "result": [
                    {
                        "type": "rectanglelabels",
                        "to_name": "image",
                        "value": {"x": 5, "y": 5, "width": 0, "height": 3, "labels": ["dog"]},
                    }
                ]
            },
            "no area",
        ),
        (
            {"result": [{"type": "keypointlabels", "to_name": "image", "value": {"x": 5, "y": 5}}]},
            "list of labels",
        ),
        (
            {
                "result": [
                    {
                        "type": "keypointlabels",
                        "to_name": "video",
                        "value": {"x": 5, "y": 5, "labels": ["dog"]},
                    }
                ]
            },
            "image 'video'",
        ),
    ],
)
def test_malformed_contexts_are_400_naming_the_problem(ls_request, context, message):
    config = parse_config(ls_request("predict-batch")["label_config"])
    with pytest.raises(ServiceError, match=message) as err:
        prompt_from_context(context, config)
    assert err.value.status == 400


def test_a_label_the_config_does_not_have_is_refused(ls_request):
    body = copy.deepcopy(ls_request("predict-interactive-keypoint"))
    body["params"]["context"]["result"][0]["value"]["keypointlabels"] = ["unicorn"]
    with pytest.raises(ServiceError, match="'unicorn' is not a label") as err:
        prompt_from_context(body["params"]["context"], parse_config(body["label_config"]))
    assert err.value.kind == "unknown_label"


@pytest.mark.parametrize("xml", ["", "<View><Image", None])
def test_bad_label_configs_are_400(xml):
    with pytest.raises(ServiceError) as err:
        parse_config(xml)
    assert err.value.status == 400


def test_polygon_and_brush_regions_pass_label_studios_own_validation(ls_request):
    xml = ls_request("predict-batch")["label_config"]
    config = parse_config(xml)
    poly = polygon_region(config.output_for("image"), "dog", [[10, 10], [50, 10], [30, 40]], (640, 480), 0.8)
    brush_output = parse_config(BRUSH_ONLY).output_for("img")
    brush = brush_region(brush_output, "Dog", [0, 0, 0, 8, 0], (64, 48), 0.5)
    assert LabelInterface(xml).validate_prediction(prediction([poly], "v1"), return_errors=True) == []
    assert LabelInterface(BRUSH_ONLY).validate_prediction(prediction([brush], "v1"), return_errors=True) == []


def test_prediction_score_is_the_mean_region_score_and_zero_when_empty():
    regions = [{"score": 0.5}, {"score": 1.0}]
    assert prediction(regions, "v")["score"] == 0.75
    assert prediction([], "v") == {"result": [], "score": 0.0, "model_version": "v"}


def test_the_config_cache_is_bounded_in_count_and_skips_huge_configs():
    from backend.labelstudio import CONFIG_CACHE_SIZE, MAX_CACHED_CONFIG_CHARS, _parse_config_cached

    _parse_config_cached.cache_clear()
    for n in range(CONFIG_CACHE_SIZE + 5):
        parse_config(PREDICTED_VALUES.replace("<View>", f"<View><!-- {n} -->"))
    assert _parse_config_cached.cache_info().currsize == CONFIG_CACHE_SIZE
    calls = _parse_config_cached.cache_info()
    huge = PREDICTED_VALUES.replace("<View>", "<View><!-- " + "x" * MAX_CACHED_CONFIG_CHARS + " -->")
    assert parse_config(huge).images == parse_config(PREDICTED_VALUES).images
    after = _parse_config_cached.cache_info()
    assert after.misses == calls.misses + 1 and after.currsize == CONFIG_CACHE_SIZE  # only the small one


@pytest.mark.parametrize("extra", [1, 1000])
def test_a_prompt_of_more_points_than_the_limit_is_a_400(ls_request, extra):
    from backend.prompt_limits import MAX_PROMPT_POINTS

    body = ls_request("predict-interactive-keypoint")
    template = body["params"]["context"]["result"][0]
    body["params"]["context"]["result"] = [copy.deepcopy(template) for _ in range(MAX_PROMPT_POINTS + extra)]
    with pytest.raises(ServiceError) as raised:
        prompt_from_context(body["params"]["context"], parse_config(body["label_config"]))
    assert raised.value.status == 400 and raised.value.kind == "too_many_points"
    body["params"]["context"]["result"] = body["params"]["context"]["result"][:MAX_PROMPT_POINTS]
    assert (
        len(prompt_from_context(body["params"]["context"], parse_config(body["label_config"])).points) == 64
    )
