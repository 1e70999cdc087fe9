"""box_mean against torch's avg_pool2d, with and without counting the zero padding."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from camoxpert.filters import box_mean


@pytest.mark.parametrize("kernel", [1, 3, 7, 31])
@pytest.mark.parametrize("count_include_pad", [True, False])
def test_box_mean_equals_avg_pool2d(kernel, count_include_pad):
    x = torch.randn(2, 5, 19, 40, generator=torch.Generator().manual_seed(kernel), requires_grad=True)
    ours = box_mean(x, kernel, count_include_pad=count_include_pad)
    reference = F.avg_pool2d(x, kernel, stride=1, padding=kernel // 2, count_include_pad=count_include_pad)
    torch.testing.assert_close(ours, reference)
    upstream = torch.randn_like(ours)
    (ours_grad,) = torch.autograd.grad(ours, x, upstream)
    (reference_grad,) = torch.autograd.grad(reference, x, upstream)
    torch.testing.assert_close(ours_grad, reference_grad)


def test_even_kernel_is_refused():
    with pytest.raises(ValueError, match="odd kernel"):
        box_mean(torch.zeros(1, 1, 4, 4), 4, count_include_pad=True)
