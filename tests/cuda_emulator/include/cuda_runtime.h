// The CUDA runtime API as far as kdfast uses it, emulated on the host (see ../cuda_emu.h).
#pragma once
#include "../cuda_emu.h"
