import tcurlora_seg
from tcurlora_seg.errors import UserError


def test_user_error_is_a_value_error():
    # library callers may catch ValueError; entry points catch UserError
    assert issubclass(UserError, ValueError)
    assert tcurlora_seg.__version__
