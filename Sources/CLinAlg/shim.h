#ifndef SMOE_CLINALG_SHIM_H
#define SMOE_CLINALG_SHIM_H
#include <cblas.h>
#include <lapacke.h>
#endif
