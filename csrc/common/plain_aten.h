// ATen calls made inside a kernel must reach the plain backend kernels: no autograd recording and
// no autocast re-casting of our carefully chosen dtypes. Worker threads of at::parallel_for do not
// inherit the caller's dispatch state, so each lambda that calls ATen opens one of these too.
#pragma once

#include <c10/core/DispatchKeySet.h>
#include <c10/core/impl/LocalDispatchKeySet.h>

namespace aqlm_lora {

struct PlainAtenCalls {
  c10::impl::ExcludeDispatchKeyGuard no_autograd{c10::autograd_dispatch_keyset_with_ADInplaceOrView};
  c10::impl::ExcludeDispatchKeyGuard no_autocast{c10::autocast_dispatch_keyset};
};

}  // namespace aqlm_lora
