/* run.h — what forward.c and plan.c share about one run in progress.
 *
 * Rows are packed: every computed token of every row is one row of the activation
 * matrices, row r's tokens at [row_off[r], row_off[r+1]). Padding is never
 * computed, so a padded row gives exactly what its real tokens give alone. A row
 * that resumes a base run computes only its tokens from start_pos on, and joins
 * the batch at its start layer; rows are ordered by start layer, so the rows being
 * computed at any layer are a prefix of the batch. */
#ifndef MS_RUN_H
#define MS_RUN_H

#include "mechscope.h"

struct ms_tape;

typedef struct {
    const ms_model *m;
    const ms_plan *plan;
    struct ms_tape *tape; /* a gradient run's forward keeps its values here (tape.h); else NULL */
    int tape_blocks;      /* with a tape: the blocks it computes (0 .. tape_blocks - 1); ln_final
                             and the logits only when that is every block */
    int n_threads;
    int N;            /* packed token rows, all rows */
    int active_rows;  /* rows computed at the current layer (a prefix) */
    int active_N;     /* their packed tokens (a prefix) */
    int *row_off;     /* [n_rows + 1] */
    int *n_real;      /* [n_rows] real tokens of the row */
    int *first;       /* [n_rows] index among the row's real tokens of its first computed token */
    int *layer0;      /* [n_rows] first block the row computes */
    int *packed_of;   /* [n_rows * n_pos]: padded position -> packed row, -1 if not computed */
    int *pos_of;      /* [N]: packed row -> padded position */
    size_t *att_off;  /* [n_rows + 1]: offsets into the attention buffer ([H, n_q, n_k] per row) */
    int *item_off;    /* [n_rows + 1]: first attention work item of each row (items of the
                         active rows are a prefix) */
    int *item_row;    /* [n_items]: the row of each item (one head of the row) */
    int max_keys;     /* the longest row's real tokens */
    int max_keys_padded; /* rounded up to a multiple of 32 */
    size_t scratch_floats; /* per thread: one head's keys of the longest row, four rows of scores */
} ms_layout;

/* Build the packed layout of a plan (checked); allocates L's index arrays, which
 * ms_layout_free frees (also after a failed build). */
ms_status ms_layout_build(ms_layout *L, const ms_model *m, const ms_plan *p, ms_error *err);
void ms_layout_free(ms_layout *L);

/* the first block row r of a plan computes (-1: from the embedding) */
int ms_plan_row_start(const ms_plan *p, int r);

/* The forward pass of a checked plan over its layout (ms_run is check, build, this). */
ms_status ms_forward_layout(const ms_model *m, const ms_plan *plan, ms_layout *L, ms_error *err);

/* Bytes of working memory of the forward pass (taped: a gradient run's, which
 * stores the attention pattern) */
size_t ms_forward_bytes(const ms_model *m, const ms_plan *plan, int taped);

/* rope[t, :] = cos | sin of position t's angles, t < n (rotary models) */
void ms_rope_table(float *rope, const ms_model *m, int n);
/* the table block `layer` rotates with, in tables of n positions from ms_rope_table
 * (which holds the local angles' table after the model's, when the model has them) */
const float *ms_block_rope(const float *rope, const ms_model *m, int layer, int n);

/* The first key (index among a row's real tokens) the row's real token `query`
 * attends to in block `layer`: 0, or where its sliding window starts. Both ends of
 * a query's keys grow with the query. */
static inline int ms_first_key(const ms_model *m, int layer, int query) {
    int w = m->blocks[layer].attn_window;
    return w > 0 && query >= w ? query - w + 1 : 0;
}

/* Apply the plan's actions for a token site. value: [N, width] with row stride ld. */
ms_status ms_visit_tokens(const ms_layout *L, ms_site site, int layer, float *value, int ld,
                          ms_error *err);

/* Apply the plan's actions for hook_attn_scores / hook_pattern. value: att buffer. */
ms_status ms_visit_attention(const ms_layout *L, ms_site site, int layer, float *value,
                             ms_error *err);

/* 1 when some action of the plan other than a cache touches (site, layer). */
int ms_plan_touches(const ms_plan *plan, ms_site site, int layer);

/* 1 when some action of the plan (a cache included) is at (site, layer). */
int ms_plan_visits(const ms_plan *plan, ms_site site, int layer);

#endif
