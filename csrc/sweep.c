/* sweep.c — patching sweeps: many patches, each an intervened run of the whole
 * base batch, executed as a few large runs.
 *
 * A patch cannot change anything before its first site or at positions before its
 * first position, so each (patch, base row) pair becomes one row that resumes the
 * base run: it joins at the patch's first block with the base's residual stream,
 * recomputes only the positions the patch can change, and attends to the base's
 * keys and values before them. Rows that cannot change at all (the patch writes
 * what is already there, or only after the position the metric reads) are not run:
 * their metric is the base's. The remaining rows are ordered by the block they
 * start at and run in chunks that fit the memory budget, so memory does not grow
 * with the number of patches. */
#include "run.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define FAIL(...)                                                  \
    do {                                                           \
        snprintf(err->message, sizeof err->message, __VA_ARGS__);  \
        return MS_ERR_VALUE;                                       \
    } while (0)

/* ---- where a write acts --------------------------------------------------------- */

/* the block a write's site belongs to: -1 for the embedding sites; the final norm
 * counts as part of the last block, which rows patching it recompute */
static int write_layer(const ms_config *c, ms_site site, int layer) {
    if (site == MS_SITE_EMBED || site == MS_SITE_POS_EMBED) return -1;
    if (!ms_site_per_layer(site)) return c->n_layers - 1;
    return layer;
}

/* the order in which a forward pass visits (site, layer): block by block, and in
 * the order of the sites inside a block */
static long order_key(const ms_config *c, ms_site site, int layer) {
    int block = ms_site_per_layer(site) ? layer : (site <= MS_SITE_POS_EMBED ? -1 : c->n_layers);
    return (long)(block + 1) * MS_N_SITES + (long)site;
}

/* floats of one row of a site's full value in the padded layout */
static size_t site_row_floats(const ms_config *c, ms_site site, int T) {
    if (ms_site_is_attention(site)) return (size_t)c->n_heads * T * T;
    return (size_t)T * ms_site_width(c, site);
}

static int is_real(const int32_t *mask, int T, int row, int t) {
    return !mask || mask[(size_t)row * T + t];
}

/* the base run's cached value of (site, layer): index into the slots, -1 if none */
typedef struct {
    int *slot;       /* [MS_N_SITES * (n_layers + 1)] */
    int n;           /* slots used */
    float **values;  /* [n] each [n_rows, site_row_floats] */
    ms_site *site;
    int *layer;
} base_cache;

static int slot_index(const ms_config *c, ms_site site, int layer) {
    return (int)site * (c->n_layers + 1) + (ms_site_per_layer(site) ? layer : c->n_layers);
}

/* ---- checks ------------------------------------------------------------------------ */

static ms_status check_write(const ms_model *m, const ms_sweep_plan *s, int i, ms_error *err) {
    const ms_write *w = &s->writes[i];
    const ms_config *c = &m->cfg;
    if ((int)w->site < 0 || w->site >= MS_N_SITES) FAIL("write %d: unknown site %d", i, (int)w->site);
    if (!ms_site_exists(c, w->site)) FAIL("write %d: this model's architecture has no site %d", i, (int)w->site);
    if (ms_site_per_layer(w->site) && (w->layer < 0 || w->layer >= c->n_layers))
        FAIL("write %d: layer %d out of range [0, %d)", i, w->layer, c->n_layers);
    int lim_a, lim_b, lim_c = 1;
    if (ms_site_is_attention(w->site)) lim_a = c->n_heads, lim_b = s->n_pos, lim_c = s->n_pos;
    else lim_a = s->n_pos, lim_b = ms_site_width(c, w->site);
    int bad = w->a0 < 0 || w->na < 1 || w->a0 > lim_a - w->na || w->b0 < 0 || w->nb < 1 ||
              w->b0 > lim_b - w->nb;
    if (ms_site_is_attention(w->site)) bad |= w->c0 < 0 || w->nc < 1 || w->c0 > lim_c - w->nc;
    if (bad) FAIL("write %d: index range out of bounds", i);
    if (!w->source) FAIL("write %d: no source values", i);
    if (w->source_rows != 1 && w->source_rows != s->n_rows)
        FAIL("write %d: the source has %d rows, expected 1 or %d", i, w->source_rows, s->n_rows);
    return MS_OK;
}

ms_status ms_sweep_check(const ms_model *m, const ms_sweep_plan *s, ms_error *err) {
    ms_status st;
    if (s->n_rows < 1 || s->n_pos < 1 || !s->tokens) FAIL("tokens: need at least one row and one position");
    if (s->n_patches < 0 || s->n_writes < 0 || (s->n_patches > 0 && !s->patches) ||
        (s->n_writes > 0 && !s->writes))
        FAIL("patches: missing");
    if (s->metric.kind == MS_METRIC_NONE || !s->metric.pos) FAIL("metric: a sweep needs a metric");
    for (int i = 0; i < s->n_writes; i++)
        if ((st = check_write(m, s, i, err))) return st;
    for (int i = 0; i < s->n_patches; i++) {
        const ms_patch *p = &s->patches[i];
        if (p->n_writes < 1 || p->first_write < 0 || p->first_write > s->n_writes - p->n_writes)
            FAIL("patch %d: its writes [%d, %d) are not among the %d writes", i, p->first_write,
                 p->first_write + p->n_writes, s->n_writes);
    }
    if (s->n_base_actions < 0 || (s->n_base_actions > 0 && !s->base_actions)) FAIL("base actions: missing");
    for (int i = 0; i < s->n_base_actions; i++) {
        ms_action_kind k = s->base_actions[i].kind;
        if (k != MS_DO_SET && k != MS_DO_ADD && k != MS_DO_SCALE && k != MS_DO_PROJECT)
            FAIL("base action %d: a sweep's base run takes only set, add, scale and subspace "
                 "interventions", i);
    }
    return MS_OK;
}

/* ---- which rows run, and from where ------------------------------------------------ */

/* One (patch, base row) pair that has to be recomputed. */
typedef struct {
    int patch, base_row;
    int start_layer, start_pos;
    long from_key; /* writes visited before this key leave the run as it is: dropped */
} sweep_row;

/* the flat index of entry (i, j, k) of a write's box inside one row's full value */
static size_t entry_offset(const ms_config *c, const ms_write *w, int T, int i, int j, int k) {
    if (ms_site_is_attention(w->site)) return (((size_t)(w->a0 + i) * T) + (size_t)(w->b0 + j)) * T + (size_t)(w->c0 + k);
    return (size_t)(w->a0 + i) * ms_site_width(c, w->site) + (size_t)(w->b0 + j);
}

/* the padded position entry (i, j, k) belongs to (queries for attention sites) */
static int entry_pos(const ms_write *w, int i, int j) {
    return ms_site_is_attention(w->site) ? w->b0 + j : w->a0 + i;
}

static int entry_real(const ms_write *w, const int32_t *mask, int T, int b, int i, int j, int k) {
    if (ms_site_is_attention(w->site)) return is_real(mask, T, b, w->b0 + j) && is_real(mask, T, b, w->c0 + k);
    return is_real(mask, T, b, w->a0 + i);
}

/* Does write w change base row b's value anywhere at a position <= max_pos? The
 * first such position goes to *first_pos (min with what is there). */
static int write_changes(const ms_config *c, const ms_sweep_plan *s, const ms_write *w,
                         const float *base_value, int b, int max_pos, int *first_pos) {
    size_t row_floats = site_row_floats(c, w->site, s->n_pos);
    const float *src = w->source + (w->source_rows == 1 ? 0 : (size_t)b * row_floats);
    const float *cur = base_value + (size_t)b * row_floats;
    int nc = ms_site_is_attention(w->site) ? w->nc : 1, found = 0;
    for (int i = 0; i < w->na; i++)
        for (int j = 0; j < w->nb; j++) {
            int pos = entry_pos(w, i, j);
            if (pos > max_pos || pos >= *first_pos) continue;
            for (int k = 0; k < nc; k++) {
                if (!entry_real(w, s->mask, s->n_pos, b, i, j, k)) continue;
                size_t off = entry_offset(c, w, s->n_pos, i, j, k);
                /* bit-for-bit: a different bit pattern (even -0 for 0) may compute differently */
                if (memcmp(src + off, cur + off, sizeof(float)) != 0) {
                    *first_pos = pos;
                    found = 1;
                    break;
                }
            }
        }
    return found;
}

/* Decide for (patch, base row b) whether it must run, and from which block and
 * position. Before the first write that changes a value, the run is the base run,
 * so writes before it are no-ops; from it on, every write may matter. */
static int plan_row(const ms_model *m, const ms_sweep_plan *s, const base_cache *bc, int patch,
                    int b, sweep_row *row) {
    const ms_config *c = &m->cfg;
    const ms_patch *p = &s->patches[patch];
    int mpos = s->metric.pos[b];
    long first_key = -1;
    /* the earliest write (in visiting order) that changes something */
    for (int i = 0; i < p->n_writes; i++) {
        const ms_write *w = &s->writes[p->first_write + i];
        long key = order_key(c, w->site, w->layer);
        if (first_key >= 0 && key >= first_key) continue;
        int pos = s->n_pos;
        int slot = bc->slot[slot_index(c, w->site, w->layer)];
        if (write_changes(c, s, w, bc->values[slot], b, mpos, &pos)) first_key = key;
    }
    if (first_key < 0) return 0;
    /* the first position any kept write changes */
    int start = s->n_pos, start_layer = c->n_layers;
    for (int i = 0; i < p->n_writes; i++) {
        const ms_write *w = &s->writes[p->first_write + i];
        if (order_key(c, w->site, w->layer) < first_key) continue;
        int slot = bc->slot[slot_index(c, w->site, w->layer)];
        if (order_key(c, w->site, w->layer) == first_key) {
            int l = write_layer(c, w->site, w->layer);
            if (l < start_layer) start_layer = l;
        }
        /* Positions before start are the base run's at every site (the row resumes from
         * the base there), so a write, here or later in the run, acts before start only
         * where it writes something else than the base's value; from start on, every
         * write is applied as the row recomputes. One pass suffices: when a write moves
         * start earlier, the positions it passes were checked against the base already
         * for the writes before it. (A later write that writes the base's value at
         * start or after may restore what an earlier one changed: it is applied there.) */
        write_changes(c, s, w, bc->values[slot], b, mpos, &start);
    }
    row->patch = patch;
    row->base_row = b;
    row->start_layer = start_layer;
    row->start_pos = start;
    row->from_key = first_key;
    return 1;
}

/* ---- building a chunk's plan ----------------------------------------------------------- */

typedef struct {
    int32_t *tokens, *mask, *base_row, *start_layer, *start_pos, *pos, *correct, *wrong;
    ms_action *actions;
    int *idx;
    float *vals;
    float *metric;
    size_t n_actions, n_idx, n_vals; /* used so far */
} chunk_bufs;

static void chunk_free(chunk_bufs *cb) {
    free(cb->tokens), free(cb->mask), free(cb->base_row), free(cb->start_layer);
    free(cb->start_pos), free(cb->pos), free(cb->correct), free(cb->wrong);
    free(cb->actions), free(cb->idx), free(cb->vals), free(cb->metric);
    memset(cb, 0, sizeof *cb);
}

static int chunk_alloc(chunk_bufs *cb, size_t rows, size_t T, size_t n_actions, size_t n_idx,
                       size_t n_vals) {
    memset(cb, 0, sizeof *cb);
    cb->tokens = malloc(sizeof(int32_t) * rows * T);
    cb->mask = malloc(sizeof(int32_t) * rows * T);
    cb->base_row = malloc(sizeof(int32_t) * rows);
    cb->start_layer = malloc(sizeof(int32_t) * rows);
    cb->start_pos = malloc(sizeof(int32_t) * rows);
    cb->pos = malloc(sizeof(int32_t) * rows);
    cb->correct = malloc(sizeof(int32_t) * rows);
    cb->wrong = malloc(sizeof(int32_t) * rows);
    cb->actions = calloc(n_actions + 1, sizeof(ms_action));
    cb->idx = malloc(sizeof(int) * (n_idx + 1));
    cb->vals = malloc(sizeof(float) * (n_vals + 1));
    cb->metric = malloc(sizeof(float) * rows);
    return cb->tokens && cb->mask && cb->base_row && cb->start_layer && cb->start_pos && cb->pos &&
           cb->correct && cb->wrong && cb->actions && cb->idx && cb->vals && cb->metric;
}

/* Does row (start_layer S, joining after the base's actions at resid_pre S) compute
 * the site of action a, so that a base action there must be applied again? */
static int recomputes(const ms_config *c, const sweep_row *r, ms_site site, int layer) {
    if (r->start_layer < 0) return 1;
    return order_key(c, site, layer) > order_key(c, MS_SITE_RESID_PRE, r->start_layer);
}

/* The part of a box (index lists ia, ib, ic; ic NULL for token sites) at positions
 * the row computes: query positions for attention sites, positions otherwise.
 * Appends the kept index lists to cb->idx and sets them in *a. */
static void keep_computed(chunk_bufs *cb, const int32_t *mask, int T, int b, int p0, ms_action *a,
                          const int *ia, int na, const int *ib, int nb, const int *ic, int nc,
                          int *keep_a, int *keep_b, int *keep_c) {
    int att = ic != NULL;
    int *out = cb->idx + cb->n_idx, n = 0;
    a->a = out;
    a->n_a = 0;
    for (int i = 0; i < na; i++)
        if (att || (ia[i] >= p0 && is_real(mask, T, b, ia[i]))) keep_a[a->n_a++] = i, out[n++] = ia[i];
    a->b = out + n;
    a->n_b = 0;
    for (int j = 0; j < nb; j++)
        if (!att || (ib[j] >= p0 && is_real(mask, T, b, ib[j]))) keep_b[a->n_b++] = j, out[n++] = ib[j];
    a->c = out + n;
    a->n_c = 0;
    for (int k = 0; att && k < nc; k++)
        if (is_real(mask, T, b, ic[k])) keep_c[a->n_c++] = k, out[n++] = ic[k];
    cb->n_idx += (size_t)n;
}

/* Row r's copy of base action a, restricted to the positions it computes. */
static void add_base_action(chunk_bufs *cb, const ms_sweep_plan *s, const ms_action *ba,
                            const sweep_row *sr, int r, int *keep_a, int *keep_b, int *keep_c) {
    int att = ms_site_is_attention(ba->site);
    ms_action *a = &cb->actions[cb->n_actions];
    *a = *ba;
    a->row = r;
    keep_computed(cb, s->mask, s->n_pos, sr->base_row, sr->start_pos, a, ba->a, ba->n_a, ba->b,
                  ba->n_b, att ? ba->c : NULL, ba->n_c, keep_a, keep_b, keep_c);
    if (a->n_a == 0 || a->n_b == 0 || (att && a->n_c == 0)) return; /* nothing left to do */
    cb->n_actions++;
    int full_c = att ? ba->n_c : 1, kept_c = att ? a->n_c : 1;
    size_t box = (size_t)ba->n_a * ba->n_b * full_c;
    /* a base action for every row holds one block of values per row */
    size_t block = ba->row < 0 ? (size_t)sr->base_row * box : 0;
    if (ba->kind == MS_DO_SCALE) return; /* value[0], shared */
    const float *src = ba->kind == MS_DO_PROJECT ? ba->value2 : ba->value;
    float *v = cb->vals + cb->n_vals;
    size_t n = 0;
    for (int i = 0; i < a->n_a; i++)
        for (int j = 0; j < a->n_b; j++)
            for (int k = 0; k < kept_c; k++)
                v[n++] = src[block + ((size_t)keep_a[i] * ba->n_b + keep_b[j]) * full_c + (att ? keep_c[k] : 0)];
    cb->n_vals += n;
    if (ba->kind == MS_DO_PROJECT) a->value2 = v; /* the basis (value) is shared */
    else a->value = v;
}

/* Row r's write w as a SET of the source's values, restricted to computed positions. */
static void add_write(chunk_bufs *cb, const ms_config *c, const ms_sweep_plan *s, const ms_write *w,
                      const sweep_row *sr, int r, int *ranges, int *keep_a, int *keep_b, int *keep_c) {
    int att = ms_site_is_attention(w->site);
    int *ia = ranges, *ib = ia + w->na, *ic = ib + w->nb;
    for (int i = 0; i < w->na; i++) ia[i] = w->a0 + i;
    for (int j = 0; j < w->nb; j++) ib[j] = w->b0 + j;
    for (int k = 0; att && k < w->nc; k++) ic[k] = w->c0 + k;
    ms_action *a = &cb->actions[cb->n_actions];
    memset(a, 0, sizeof *a);
    a->kind = MS_DO_SET;
    a->site = w->site;
    a->layer = w->layer;
    a->row = r;
    keep_computed(cb, s->mask, s->n_pos, sr->base_row, sr->start_pos, a, ia, w->na, ib, w->nb,
                  att ? ic : NULL, att ? w->nc : 0, keep_a, keep_b, keep_c);
    if (a->n_a == 0 || a->n_b == 0 || (att && a->n_c == 0)) return;
    cb->n_actions++;
    size_t row_floats = site_row_floats(c, w->site, s->n_pos);
    const float *src = w->source + (w->source_rows == 1 ? 0 : (size_t)sr->base_row * row_floats);
    float *v = cb->vals + cb->n_vals;
    size_t n = 0;
    for (int i = 0; i < a->n_a; i++)
        for (int j = 0; j < a->n_b; j++) {
            if (!att) {
                v[n++] = src[entry_offset(c, w, s->n_pos, keep_a[i], keep_b[j], 0)];
                continue;
            }
            for (int k = 0; k < a->n_c; k++) v[n++] = src[entry_offset(c, w, s->n_pos, keep_a[i], keep_b[j], keep_c[k])];
        }
    a->value = v;
    cb->n_vals += n;
}

/* sizes of the actions, index lists and values of one row, as an upper bound */
static void row_action_sizes(const ms_config *c, const ms_sweep_plan *s, const sweep_row *sr,
                             size_t *n_actions, size_t *n_idx, size_t *n_vals) {
    for (int i = 0; i < s->n_base_actions; i++) {
        const ms_action *a = &s->base_actions[i];
        if ((a->row >= 0 && a->row != sr->base_row) || !recomputes(c, sr, a->site, a->layer)) continue;
        *n_actions += 1;
        *n_idx += (size_t)a->n_a + a->n_b + a->n_c;
        *n_vals += (size_t)a->n_a * a->n_b * (ms_site_is_attention(a->site) ? a->n_c : 1);
    }
    const ms_patch *p = &s->patches[sr->patch];
    for (int i = 0; i < p->n_writes; i++) {
        const ms_write *w = &s->writes[p->first_write + i];
        if (order_key(c, w->site, w->layer) < sr->from_key) continue;
        *n_actions += 1;
        *n_idx += (size_t)w->na + w->nb + w->nc;
        *n_vals += (size_t)w->na * w->nb * (ms_site_is_attention(w->site) ? w->nc : 1);
    }
}

/* largest index list of any action or write: the size of the scratch lists */
static int max_list(const ms_sweep_plan *s) {
    int n = 1;
    for (int i = 0; i < s->n_base_actions; i++) {
        const ms_action *a = &s->base_actions[i];
        if (a->n_a > n) n = a->n_a;
        if (a->n_b > n) n = a->n_b;
        if (a->n_c > n) n = a->n_c;
    }
    for (int i = 0; i < s->n_writes; i++) {
        const ms_write *w = &s->writes[i];
        if (w->na + w->nb + w->nc > n) n = w->na + w->nb + w->nc;
    }
    return n;
}

static ms_status run_chunk(const ms_model *m, const ms_sweep_plan *s, const ms_state *base,
                           const sweep_row *rows, int n_rows, float *out, ms_error *err) {
    const ms_config *c = &m->cfg;
    int T = s->n_pos;
    size_t n_actions = 0, n_idx = 0, n_vals = 0;
    for (int r = 0; r < n_rows; r++) row_action_sizes(c, s, &rows[r], &n_actions, &n_idx, &n_vals);
    chunk_bufs cb;
    int list = max_list(s);
    int *scratch = malloc(sizeof(int) * 4 * ((size_t)list + 1));
    if (!chunk_alloc(&cb, (size_t)n_rows, (size_t)T, n_actions, n_idx, n_vals) || !scratch) {
        chunk_free(&cb);
        free(scratch);
        snprintf(err->message, sizeof err->message, "out of memory for a chunk of the sweep");
        return MS_ERR_MEMORY;
    }
    int *keep_a = scratch, *keep_b = keep_a + list + 1, *keep_c = keep_b + list + 1;
    int *ranges = keep_c + list + 1; /* holds a write's three ranges: na + nb + nc <= list */
    for (int r = 0; r < n_rows; r++) {
        const sweep_row *sr = &rows[r];
        int b = sr->base_row;
        memcpy(cb.tokens + (size_t)r * T, s->tokens + (size_t)b * T, sizeof(int32_t) * T);
        for (int t = 0; t < T; t++) cb.mask[(size_t)r * T + t] = is_real(s->mask, T, b, t);
        cb.base_row[r] = b;
        cb.start_layer[r] = sr->start_layer;
        cb.start_pos[r] = sr->start_pos;
        cb.pos[r] = s->metric.pos[b];
        cb.correct[r] = s->metric.correct ? s->metric.correct[b] : 0;
        cb.wrong[r] = s->metric.wrong ? s->metric.wrong[b] : 0;
        /* at a site, the base run's interventions first, then the patch */
        for (int i = 0; i < s->n_base_actions; i++) {
            const ms_action *a = &s->base_actions[i];
            if ((a->row < 0 || a->row == b) && recomputes(c, sr, a->site, a->layer))
                add_base_action(&cb, s, a, sr, r, keep_a, keep_b, keep_c);
        }
        const ms_patch *p = &s->patches[sr->patch];
        for (int i = 0; i < p->n_writes; i++) {
            const ms_write *w = &s->writes[p->first_write + i];
            if (order_key(c, w->site, w->layer) >= sr->from_key)
                add_write(&cb, c, s, w, sr, r, ranges, keep_a, keep_b, keep_c);
        }
    }
    ms_plan plan = {0};
    plan.n_rows = n_rows;
    plan.n_pos = T;
    plan.tokens = cb.tokens;
    plan.mask = cb.mask;
    plan.n_actions = (int)cb.n_actions;
    plan.actions = cb.actions;
    plan.n_threads = s->n_threads;
    plan.base = base;
    plan.base_row = cb.base_row;
    plan.start_layer = cb.start_layer;
    plan.start_pos = cb.start_pos;
    plan.metric = s->metric;
    plan.metric.pos = cb.pos;
    plan.metric.correct = cb.correct;
    plan.metric.wrong = cb.wrong;
    plan.metric_out = cb.metric;
    plan.stop = s->stop;
    ms_status st = ms_run(m, &plan, err);
    if (st == MS_OK)
        for (int r = 0; r < n_rows; r++) out[(size_t)rows[r].patch * s->n_rows + rows[r].base_row] = cb.metric[r];
    chunk_free(&cb);
    free(scratch);
    return st;
}

/* working memory of one row, roughly as ms_run will allocate it */
static size_t row_bytes(const ms_config *c, const ms_sweep_plan *s, const sweep_row *sr,
                        const int *n_real) {
    size_t C = (size_t)c->d_model, n = (size_t)n_real[sr->base_row], first = 0;
    for (int t = 0; t < sr->start_pos; t++) first += (size_t)is_real(s->mask, s->n_pos, sr->base_row, t);
    size_t nq = n - first;
    size_t experts = c->n_experts ? 2 * (size_t)c->n_experts + C + 1 : 0; /* moe_sites' buffers */
    size_t floats = nq * (C * 9 + 1 + (size_t)c->d_mlp + experts) + (size_t)c->n_heads * nq * n + 2 * n * C + C;
    if (s->metric.kind != MS_METRIC_LOGIT_DIFF) floats += (size_t)c->d_vocab;
    size_t actions = 0, idx = 0, vals = 0;
    row_action_sizes(c, s, sr, &actions, &idx, &vals);
    return floats * sizeof(float) + actions * sizeof(ms_action) + idx * sizeof(int) +
           vals * sizeof(float) + (size_t)s->n_pos * 2 * sizeof(int32_t) + 64;
}

/* ---- the sweep --------------------------------------------------------------------------- */

static void base_cache_free(base_cache *bc) {
    for (int i = 0; i < bc->n; i++) free(bc->values[i]);
    free(bc->values), free(bc->slot), free(bc->site), free(bc->layer);
    memset(bc, 0, sizeof *bc);
}

/* one slot for every (site, layer) some write touches */
static int base_cache_alloc(base_cache *bc, const ms_config *c, const ms_sweep_plan *s) {
    size_t n_slots = (size_t)MS_N_SITES * (c->n_layers + 1);
    memset(bc, 0, sizeof *bc);
    bc->slot = malloc(sizeof(int) * n_slots);
    bc->values = calloc(n_slots, sizeof(float *));
    bc->site = malloc(sizeof(ms_site) * n_slots);
    bc->layer = malloc(sizeof(int) * n_slots);
    if (!bc->slot || !bc->values || !bc->site || !bc->layer) return 0;
    for (size_t i = 0; i < n_slots; i++) bc->slot[i] = -1;
    for (int i = 0; i < s->n_writes; i++) {
        const ms_write *w = &s->writes[i];
        int k = slot_index(c, w->site, w->layer);
        if (bc->slot[k] >= 0) continue;
        float *v = malloc(sizeof(float) * ((size_t)s->n_rows * site_row_floats(c, w->site, s->n_pos) + 1));
        if (!v) return 0;
        bc->slot[k] = bc->n;
        bc->values[bc->n] = v;
        bc->site[bc->n] = w->site;
        bc->layer[bc->n] = w->layer;
        bc->n++;
    }
    return 1;
}

/* The base run, recorded, with the base's values cached at every written site. */
static ms_status run_base(const ms_model *m, const ms_sweep_plan *s, base_cache *bc, ms_state *state,
                          float *base_metric, ms_error *err) {
    ms_action *actions = calloc((size_t)s->n_base_actions + (size_t)bc->n + 1, sizeof(ms_action));
    if (!actions) {
        snprintf(err->message, sizeof err->message, "out of memory starting the sweep");
        return MS_ERR_MEMORY;
    }
    if (s->n_base_actions) memcpy(actions, s->base_actions, sizeof(ms_action) * (size_t)s->n_base_actions);
    for (int i = 0; i < bc->n; i++) {
        ms_action *a = &actions[s->n_base_actions + i];
        a->kind = MS_DO_CACHE;
        a->site = bc->site[i];
        a->layer = bc->layer[i];
        a->row = -1;
        a->out = bc->values[i];
    }
    ms_plan bp = {0};
    bp.n_rows = s->n_rows;
    bp.n_pos = s->n_pos;
    bp.tokens = s->tokens;
    bp.mask = s->mask;
    bp.n_actions = s->n_base_actions + bc->n; /* caches come last: they see the final value */
    bp.actions = actions;
    bp.n_threads = s->n_threads;
    bp.record = state;
    bp.metric = s->metric;
    bp.metric_out = base_metric;
    bp.stop = s->stop;
    ms_status st = ms_run(m, &bp, err);
    free(actions);
    return st;
}

static ms_status interrupted(ms_error *err) {
    snprintf(err->message, sizeof err->message, "the sweep was interrupted");
    return MS_ERR_INTERRUPTED;
}

ms_status ms_sweep(const ms_model *m, const ms_sweep_plan *s, float *out, float *base_out,
                   ms_error *err) {
    const ms_config *c = &m->cfg;
    ms_status st = ms_sweep_check(m, s, err);
    if (st) return st;
    ms_state state = {0};
    base_cache bc;
    size_t n_pairs = (size_t)s->n_patches * s->n_rows;
    float *base_metric = malloc(sizeof(float) * (size_t)s->n_rows);
    sweep_row *rows = malloc(sizeof(sweep_row) * (n_pairs + 1));
    sweep_row *sorted = malloc(sizeof(sweep_row) * (n_pairs + 1));
    int *n_real = malloc(sizeof(int) * (size_t)s->n_rows);
    int ok = base_cache_alloc(&bc, c, s);
    if (!ok || !base_metric || !rows || !sorted || !n_real) {
        snprintf(err->message, sizeof err->message, "out of memory starting the sweep");
        st = MS_ERR_MEMORY;
        goto done;
    }
    /* the base run also checks the tokens, the metric's arguments and the base actions */
    if ((st = run_base(m, s, &bc, &state, base_metric, err))) goto done;
    if (base_out) memcpy(base_out, base_metric, sizeof(float) * (size_t)s->n_rows);
    for (int b = 0; b < s->n_rows; b++) {
        n_real[b] = 0;
        for (int t = 0; t < s->n_pos; t++) n_real[b] += is_real(s->mask, s->n_pos, b, t);
    }

    /* every pair gets the base's value; the pairs that can change are run below */
    size_t n_run = 0;
    for (int i = 0; i < s->n_patches; i++) {
        if (s->stop && *s->stop) {
            st = interrupted(err);
            goto done;
        }
        for (int b = 0; b < s->n_rows; b++) {
            out[(size_t)i * s->n_rows + b] = base_metric[b];
            if (plan_row(m, s, &bc, i, b, &rows[n_run])) n_run++;
        }
    }
    /* ordered by start layer (a stable counting sort), as ms_run needs */
    size_t k = 0;
    for (int layer = -1; layer < c->n_layers; layer++)
        for (size_t r = 0; r < n_run; r++)
            if (rows[r].start_layer == layer) sorted[k++] = rows[r];

    size_t first = 0;
    while (first < n_run) {
        size_t bytes = row_bytes(c, s, &sorted[first], n_real), last = first + 1;
        while (last < n_run && last - first < (size_t)1 << 30) {
            size_t more = row_bytes(c, s, &sorted[last], n_real);
            if (bytes + more > s->chunk_bytes) break;
            bytes += more;
            last++;
        }
        if ((st = run_chunk(m, s, &state, sorted + first, (int)(last - first), out, err))) goto done;
        first = last;
        if (s->progress && s->progress(s->progress_ctx, (int)first, (int)n_run)) {
            snprintf(err->message, sizeof err->message, "the sweep was interrupted");
            st = MS_ERR_CALLBACK;
            goto done;
        }
    }
done:
    ms_state_free(&state);
    base_cache_free(&bc);
    free(base_metric);
    free(rows);
    free(sorted);
    free(n_real);
    return st;
}
