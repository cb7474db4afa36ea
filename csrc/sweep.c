/* sweep.c — patching sweeps: many patches, each an intervened run of the whole
 * base batch, executed as few large runs.
 *
 * A patch at block L and position p cannot change anything before L or before p,
 * so its rows resume the base run: they join at block L with the base's residual
 * stream, recompute only positions >= p, and attend to the base's keys and values
 * before p. Patches are taken in order of layer and grouped into chunks that fit
 * the memory budget, so memory does not grow with the number of patches. */
#include "run.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define FAIL(...)                                                  \
    do {                                                           \
        snprintf(err->message, sizeof err->message, __VA_ARGS__);  \
        return MS_ERR_VALUE;                                       \
    } while (0)

/* the first block a patch's rows compute */
static int patch_layer(const ms_model *m, const ms_patch *pt) {
    if (pt->site == MS_SITE_EMBED || pt->site == MS_SITE_POS_EMBED) return 0;
    if (!ms_site_per_layer(pt->site)) return m->cfg.n_layers - 1; /* the final norm */
    return pt->layer;
}

/* the first padded position a patch can change */
static int patch_pos(const ms_patch *pt) {
    return ms_site_is_attention(pt->site) ? pt->b0 : pt->a0;
}

static size_t patch_box(const ms_patch *pt) {
    size_t box = (size_t)pt->na * pt->nb;
    return ms_site_is_attention(pt->site) ? box * pt->nc : box;
}

static ms_status check_patch(const ms_model *m, const ms_sweep_plan *s, int i, ms_error *err) {
    const ms_patch *pt = &s->patches[i];
    const ms_config *c = &m->cfg;
    if ((int)pt->site < 0 || pt->site >= MS_N_SITES) FAIL("patch %d: unknown site", i);
    if (ms_site_per_layer(pt->site) && (pt->layer < 0 || pt->layer >= c->n_layers))
        FAIL("patch %d: layer %d out of range [0, %d)", i, pt->layer, c->n_layers);
    int lim_a, lim_b, lim_c = 1;
    if (ms_site_is_attention(pt->site)) lim_a = c->n_heads, lim_b = s->n_pos, lim_c = s->n_pos;
    else lim_a = s->n_pos, lim_b = ms_site_width(c, pt->site);
    if (pt->a0 < 0 || pt->na < 1 || pt->a0 + pt->na > lim_a || pt->b0 < 0 || pt->nb < 1 ||
        pt->b0 + pt->nb > lim_b ||
        (ms_site_is_attention(pt->site) && (pt->c0 < 0 || pt->nc < 1 || pt->c0 + pt->nc > lim_c)))
        FAIL("patch %d: index range out of bounds", i);
    return MS_OK;
}

static int real_at(const ms_sweep_plan *s, int row, int t) {
    return !s->mask || s->mask[(size_t)row * s->n_pos + t];
}

/* Per-chunk storage of the rows' actions and their index lists and values. */
typedef struct {
    int32_t *tokens, *mask, *base_row, *start_layer, *start_pos, *pos, *correct, *wrong;
    ms_action *actions;
    int *idx;      /* index lists of all actions */
    float *vals;   /* values of all actions */
    float *metric; /* [rows] */
} chunk_bufs;

static void chunk_free(chunk_bufs *cb) {
    free(cb->tokens); free(cb->mask); free(cb->base_row); free(cb->start_layer);
    free(cb->start_pos); free(cb->pos); free(cb->correct); free(cb->wrong);
    free(cb->actions); free(cb->idx); free(cb->vals); free(cb->metric);
    memset(cb, 0, sizeof *cb);
}

static int chunk_alloc(chunk_bufs *cb, size_t rows, size_t T, size_t n_idx, size_t n_vals) {
    cb->tokens = malloc(sizeof(int32_t) * rows * T);
    cb->mask = malloc(sizeof(int32_t) * rows * T);
    cb->base_row = malloc(sizeof(int32_t) * rows);
    cb->start_layer = malloc(sizeof(int32_t) * rows);
    cb->start_pos = malloc(sizeof(int32_t) * rows);
    cb->pos = malloc(sizeof(int32_t) * rows);
    cb->correct = malloc(sizeof(int32_t) * rows);
    cb->wrong = malloc(sizeof(int32_t) * rows);
    cb->actions = calloc(rows, sizeof(ms_action));
    cb->idx = malloc(sizeof(int) * (n_idx + 1));
    cb->vals = malloc(sizeof(float) * (n_vals + 1));
    cb->metric = malloc(sizeof(float) * rows);
    return cb->tokens && cb->mask && cb->base_row && cb->start_layer && cb->start_pos && cb->pos &&
           cb->correct && cb->wrong && cb->actions && cb->idx && cb->vals && cb->metric;
}

/* Row b of patch pt: the action writing the patch's values at the row's real
 * positions inside the box (padding in the box is left alone). */
static void build_action(const ms_sweep_plan *s, const ms_patch *pt, int b, const float *src,
                         ms_action *a, int **idx, float **vals) {
    int att = ms_site_is_attention(pt->site);
    a->kind = MS_DO_SET;
    a->site = pt->site;
    a->layer = pt->layer;
    a->src_row = 0;
    /* which entries of each range are kept, as index lists */
    int *ia = *idx, *ib, *ic;
    int na = 0, nb = 0, nc = 0;
    for (int i = 0; i < pt->na; i++)
        if (att || real_at(s, b, pt->a0 + i)) ia[na++] = pt->a0 + i;
    ib = ia + na;
    for (int i = 0; i < pt->nb; i++)
        if (!att || real_at(s, b, pt->b0 + i)) ib[nb++] = pt->b0 + i;
    ic = ib + nb;
    if (att)
        for (int i = 0; i < pt->nc; i++)
            if (real_at(s, b, pt->c0 + i)) ic[nc++] = pt->c0 + i;
    *idx = ic + nc;
    a->a = ia, a->b = ib, a->c = ic;
    a->n_a = na, a->n_b = nb, a->n_c = nc;
    /* the kept values, in the same order */
    float *v = *vals;
    size_t k = 0;
    int full_b = pt->nb, full_c = att ? pt->nc : 1;
    for (int i = 0; i < na; i++)
        for (int j = 0; j < nb; j++) {
            size_t at = (size_t)(ia[i] - pt->a0) * full_b + (size_t)(ib[j] - pt->b0);
            if (!att) v[k++] = src[at];
            else
                for (int l = 0; l < nc; l++) v[k++] = src[at * full_c + (size_t)(ic[l] - pt->c0)];
        }
    a->value = v;
    *vals = v + k;
    a->row = 0; /* set by the caller */
}

static ms_status run_chunk(const ms_model *m, const ms_sweep_plan *s, const ms_state *base,
                           const int *order, int first, int last, const size_t *val_off,
                           float *out, ms_error *err) {
    int B = s->n_rows, T = s->n_pos;
    size_t rows = (size_t)(last - first) * B, n_idx = 0, n_vals = 0;
    for (int i = first; i < last; i++) {
        const ms_patch *pt = &s->patches[order[i]];
        n_idx += (size_t)B * (pt->na + pt->nb + pt->nc);
        n_vals += (size_t)B * patch_box(pt);
    }
    chunk_bufs cb = {0};
    ms_status st = MS_OK;
    if (!chunk_alloc(&cb, rows, (size_t)T, n_idx, n_vals)) {
        chunk_free(&cb);
        snprintf(err->message, sizeof err->message, "out of memory for a chunk of the sweep");
        return MS_ERR_MEMORY;
    }
    int *idx = cb.idx;
    float *vals = cb.vals;
    size_t r = 0;
    for (int i = first; i < last; i++) {
        const ms_patch *pt = &s->patches[order[i]];
        int layer = patch_layer(m, pt);
        for (int b = 0; b < B; b++, r++) {
            memcpy(cb.tokens + r * T, s->tokens + (size_t)b * T, sizeof(int32_t) * T);
            for (int t = 0; t < T; t++) cb.mask[r * T + t] = real_at(s, b, t);
            cb.base_row[r] = b;
            cb.start_layer[r] = layer;
            /* start at the first real position the patch can change, but never after
             * the position the metric reads */
            int p0 = patch_pos(pt);
            while (p0 < T && !real_at(s, b, p0)) p0++;
            int mpos = s->metric.pos[b];
            cb.start_pos[r] = p0 < mpos ? p0 : mpos;
            cb.pos[r] = mpos;
            cb.correct[r] = s->metric.correct ? s->metric.correct[b] : 0;
            cb.wrong[r] = s->metric.wrong ? s->metric.wrong[b] : 0;
            const float *src = s->values + val_off[order[i]] + (size_t)b * patch_box(pt);
            build_action(s, pt, b, src, &cb.actions[r], &idx, &vals);
            cb.actions[r].row = (int)r;
        }
    }
    ms_plan plan = {0};
    plan.n_rows = (int)rows;
    plan.n_pos = T;
    plan.tokens = cb.tokens;
    plan.mask = cb.mask;
    plan.n_actions = (int)rows;
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
    st = ms_run(m, &plan, err);
    if (st == MS_OK) {
        r = 0;
        for (int i = first; i < last; i++)
            for (int b = 0; b < B; b++, r++) out[(size_t)order[i] * B + b] = cb.metric[r];
    }
    chunk_free(&cb);
    return st;
}

/* working memory of one patch's rows, roughly as ms_run will allocate it */
static size_t patch_bytes(const ms_model *m, const ms_sweep_plan *s, const ms_patch *pt) {
    const ms_config *c = &m->cfg;
    size_t C = (size_t)c->d_model, total = 0;
    for (int b = 0; b < s->n_rows; b++) {
        size_t n = 0;
        for (int t = 0; t < s->n_pos; t++) n += real_at(s, b, t);
        size_t nq = n > (size_t)patch_pos(pt) ? n - (size_t)patch_pos(pt) : 1;
        total += nq * (C * 10 + 1 + (size_t)c->d_mlp) + (size_t)c->n_heads * nq * n + 3 * n * C;
        if (s->metric.kind != MS_METRIC_LOGIT_DIFF) total += (size_t)c->d_vocab;
        total += (size_t)s->n_pos * 2 + patch_box(pt) + (size_t)(pt->na + pt->nb + pt->nc);
    }
    return total * sizeof(float);
}

ms_status ms_sweep(const ms_model *m, const ms_sweep_plan *s, float *out, ms_error *err) {
    ms_status st;
    if (s->n_patches < 0 || (s->n_patches > 0 && (!s->patches || !s->values)))
        FAIL("patches: missing");
    if (s->metric.kind == MS_METRIC_NONE || !s->metric.pos) FAIL("metric: a sweep needs a metric");
    for (int i = 0; i < s->n_patches; i++)
        if ((st = check_patch(m, s, i, err))) return st;

    /* the base run, recorded; its metric values also validate the metric's arguments */
    ms_state base = {0};
    float *base_metric = malloc(sizeof(float) * (size_t)s->n_rows);
    int *order = malloc(sizeof(int) * ((size_t)s->n_patches + 1));
    size_t *val_off = malloc(sizeof(size_t) * ((size_t)s->n_patches + 1));
    if (!base_metric || !order || !val_off) {
        free(base_metric), free(order), free(val_off);
        snprintf(err->message, sizeof err->message, "out of memory starting the sweep");
        return MS_ERR_MEMORY;
    }
    ms_plan bp = {0};
    bp.n_rows = s->n_rows;
    bp.n_pos = s->n_pos;
    bp.tokens = s->tokens;
    bp.mask = s->mask;
    bp.n_threads = s->n_threads;
    bp.record = &base;
    bp.metric = s->metric;
    bp.metric_out = base_metric;
    if ((st = ms_run(m, &bp, err))) goto done;

    /* patches in order of the layer they start at (a stable counting sort) */
    val_off[0] = 0;
    for (int i = 0; i < s->n_patches; i++)
        val_off[i + 1] = val_off[i] + (size_t)s->n_rows * patch_box(&s->patches[i]);
    int k = 0;
    for (int layer = 0; layer < m->cfg.n_layers; layer++)
        for (int i = 0; i < s->n_patches; i++)
            if (patch_layer(m, &s->patches[i]) == layer) order[k++] = i;

    int first = 0;
    while (first < s->n_patches) {
        size_t bytes = patch_bytes(m, s, &s->patches[order[first]]);
        int last = first + 1;
        while (last < s->n_patches) {
            size_t more = patch_bytes(m, s, &s->patches[order[last]]);
            if (bytes + more > s->chunk_bytes) break;
            bytes += more;
            last++;
        }
        if ((st = run_chunk(m, s, &base, order, first, last, val_off, out, err))) goto done;
        first = last;
        if (s->progress && s->progress(s->progress_ctx, first, s->n_patches)) {
            snprintf(err->message, sizeof err->message, "the sweep was interrupted");
            st = MS_ERR_CALLBACK;
            goto done;
        }
    }
done:
    ms_state_free(&base);
    free(base_metric);
    free(order);
    free(val_off);
    return st;
}
