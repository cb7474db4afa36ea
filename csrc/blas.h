/* blas.h — the one place that names the BLAS.
 *
 * mechscope links the OpenBLAS that the scipy-openblas32 wheel ships: a recent
 * release built with run-time CPU dispatch, whose symbols all carry the prefix
 * "scipy_" so that it never clashes with the BLAS NumPy or PyTorch load. */
#ifndef MS_BLAS_H
#define MS_BLAS_H

#include <cblas.h>

#define ms_sgemm scipy_cblas_sgemm
#define ms_blas_set_threads scipy_openblas_set_num_threads
#define ms_blas_get_threads scipy_openblas_get_num_threads
#define ms_blas_get_config scipy_openblas_get_config
#define ms_blas_get_corename scipy_openblas_get_corename

#endif
