/* run.h — what forward.c and plan.c share about one run in progress.
 *
 * Rows are packed: every real (unmasked) token of every row is one row of the
 * activation matrices, row r's tokens at [row_off[r], row_off[r+1]). Padding is
 * never computed: a padded row gives exactly what its real tokens give alone. */
#ifndef MS_RUN_H
#define MS_RUN_H

#include "mechscope.h"

typedef struct {
    const ms_model *m;
    const ms_plan *plan;
    int n_threads;
    int N;           /* packed token rows */
    int *row_off;    /* [n_rows + 1] */
    int *packed_of;  /* [n_rows * n_pos]: padded position -> packed row, -1 for padding */
    int *pos_of;     /* [N]: packed row -> padded position */
    size_t *att_off; /* [n_rows + 1]: offsets into the attention buffer ([H, n, n] per row) */
} ms_layout;

/* Apply the plan's actions for a token site. value: [N, width] with row stride ld. */
ms_status ms_visit_tokens(const ms_layout *L, ms_site site, int layer, float *value, int ld,
                          ms_error *err);

/* Apply the plan's actions for hook_attn_scores / hook_pattern. value: att buffer. */
ms_status ms_visit_attention(const ms_layout *L, ms_site site, int layer, float *value,
                             ms_error *err);

/* 1 when some action of the plan touches (site, layer). */
int ms_plan_touches(const ms_plan *plan, ms_site site, int layer);

#endif
