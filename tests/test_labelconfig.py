"""The label config decides what is pre-labeled: every <Labels> -> <Text> pair, with hints and aliases."""

import pytest

from backend.infra.errors import UnsupportedLabelConfig
from backend.ner.labelconfig import parse_label_config
from tests.conftest import NER_CONFIG


def test_conll_config_gives_one_target_with_four_labels():
    schema = parse_label_config(NER_CONFIG)
    (target,) = schema.targets
    assert (target.from_name, target.to_name, target.data_key) == ("label", "text", "text")
    assert target.label_names == ("PER", "ORG", "LOC", "MISC")
    assert target.labels[0].hint == "people, including fictional"


def test_alias_is_the_result_name_and_value_becomes_its_description():
    schema = parse_label_config(
        '<View><Labels name="ner" toName="doc"><Label value="Organisation" alias="ORG" hint="companies"/>'
        '</Labels><Text name="doc" value="$body"/></View>'
    )
    (label,) = schema.targets[0].labels
    assert label.name == "ORG"
    assert label.description == "Organisation - companies"
    assert schema.targets[0].data_key == "body"


def test_several_pairs_are_all_targets():
    schema = parse_label_config(
        "<View>"
        '<Labels name="a" toName="t1"><Label value="PER"/></Labels><Text name="t1" value="$title"/>'
        '<Labels name="b" toName="t2"><Label value="LOC"/><Label value="ORG"/></Labels><Text name="t2" value="$body"/>'
        '<TextArea name="instructions" toName="t2"/>'
        "</View>"
    )
    assert [(t.from_name, t.data_key, t.label_names) for t in schema.targets] == [
        ("a", "title", ("PER",)),
        ("b", "body", ("LOC", "ORG")),
    ]
    assert schema.textareas == {"t2": ("instructions",)}


@pytest.mark.parametrize(
    "config",
    [
        "",
        "<View><Image name='img' value='$image'/><Choices name='c' toName='img'><Choice value='a'/></Choices></View>",
        "<View><Text name='text' value='$text'/><Choices name='c' toName='text'><Choice value='a'/></Choices></View>",
        "<View><Labels name='l' toName='text'>",
    ],
)
def test_configs_without_a_labels_to_text_pair_are_refused_with_what_is_supported(config):
    with pytest.raises(UnsupportedLabelConfig) as error:
        parse_label_config(config)
    assert "<Labels" in str(error.value) and error.value.status == 422
