/* train.c - train a DeepSeek-style model with mHC / HC / plain residual streams on token shards.

   ./train --preset tiny --steps 500 --out out/tiny        trains, writes checkpoints, log.csv, plots
   ./train --preset 27b --dry-run                          config, parameters, FLOPs, memory; no model
   ./train --loss-gap runs/gap.png runs/plain runs/mhc     loss-gap plot of finished runs vs the first
   ./train --help                                          every flag

   Built with gcc it trains on the CPU (OpenMP); built with nvcc (make gpu) it includes mhc_cuda.cuh
   and runs every step on the GPU. Checkpoints: OUT/model.safetensors (weights, expert biases, the
   config in the metadata) and OUT/optim.safetensors (AdamW moments, step, data position), each
   written to a temporary file and renamed. */
#define MHC_IMPLEMENTATION
#include "mhc.h"
#ifdef __CUDACC__
#include "mhc_cuda.cuh"
#endif

#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>

/* =============================================================================================
   Plotting: line charts and heatmaps as PNG (stb_image_write), text with stb_easy_font.          */
// ----------------------------------------------------------------------------
// PNG plots (SPEC §14). A plot_canvas is an RGB buffer; text comes from stb_easy_font (quads that we
// fill ourselves, scaled by an integer factor); PNG output from stb_image_write. No global state.

#define STB_IMAGE_WRITE_STATIC
#define STB_IMAGE_WRITE_IMPLEMENTATION
#include <stb/stb_image_write.h>
#include <stb/stb_easy_font.h>

typedef struct { unsigned char r, g, b; } plot_rgb;

static plot_rgb plot_rgb_make(int r, int g, int b) {
    plot_rgb c = {(unsigned char)r, (unsigned char)g, (unsigned char)b};
    return c;
}

// RGB image, 3 bytes per pixel, row-major, origin at the top left, y grows downwards.
typedef struct { int w, h; unsigned char *pix; } plot_canvas;

// One line-chart series. Points whose x or y is NaN/inf (or y <= 0 on a log axis) are skipped and the
// line joins the neighbouring valid points, so a sparse series (val loss) may be NaN-padded or given
// with its own x array.
typedef struct {
    const char *name;   // legend entry; NULL: not in the legend
    const float *x;     // n x values; NULL: x = 0, 1, ..., n-1
    const float *y;     // n y values
    int n;
    plot_rgb color;
    int width;          // line width in px: 0 -> 2 (default), 1 -> thin, -1 -> no line (markers only)
    int marker;         // nonzero: a filled square at every valid point
} plot_series;

#define PLOT_LINES_W 1000   // line chart size in px
#define PLOT_LINES_H 600
#define PLOT_MAX_TICKS 64

// the i-th colour of a 10-colour qualitative palette (matplotlib "tab10"), i >= 0, wraps around
static plot_rgb plot_color(int i) {
    static const unsigned char pal[10][3] = {
        {31, 119, 180}, {255, 127, 14}, {44, 160, 44}, {214, 39, 40}, {148, 103, 189},
        {140, 86, 75}, {227, 119, 194}, {127, 127, 127}, {188, 189, 34}, {23, 190, 207}};
    const unsigned char *p = pal[((i % 10) + 10) % 10];
    return plot_rgb_make(p[0], p[1], p[2]);
}

// linear blend: t = 0 gives a, t = 1 gives b (e.g. plot_mix(col, plot_rgb_make(255, 255, 255), 0.6f) for a light shade)
static plot_rgb plot_mix(plot_rgb a, plot_rgb b, float t) {
    if (t < 0.0f) t = 0.0f;
    if (t > 1.0f) t = 1.0f;
    return plot_rgb_make(a.r + (b.r - a.r) * t + 0.5f, a.g + (b.g - a.g) * t + 0.5f, a.b + (b.b - a.b) * t + 0.5f);
}

// fills the rectangle [x0, x1) x [y0, y1), clipped to the canvas
static void plot_fill_rect(plot_canvas *c, int x0, int y0, int x1, int y1, plot_rgb col) {
    if (x0 < 0) x0 = 0;
    if (y0 < 0) y0 = 0;
    if (x1 > c->w) x1 = c->w;
    if (y1 > c->h) y1 = c->h;
    for (int y = y0; y < y1; y++) {
        unsigned char *p = c->pix + ((size_t)y * c->w + x0) * 3;
        for (int x = x0; x < x1; x++, p += 3) { p[0] = col.r; p[1] = col.g; p[2] = col.b; }
    }
}

static void plot_fill(plot_canvas *c, plot_rgb col) { plot_fill_rect(c, 0, 0, c->w, c->h, col); }

// allocates a w x h canvas filled with white; 0 on success, -1 (with a message) on failure
static int plot_canvas_init(plot_canvas *c, int w, int h) {
    c->w = 0; c->h = 0; c->pix = NULL;
    if (w <= 0 || h <= 0 || w > 16384 || h > 16384) {
        fprintf(stderr, "plot: bad canvas size %dx%d\n", w, h);
        return -1;
    }
    c->pix = (unsigned char *)malloc((size_t)w * h * 3);
    if (c->pix == NULL) {
        fprintf(stderr, "plot: out of memory for a %dx%d canvas\n", w, h);
        return -1;
    }
    c->w = w; c->h = h;
    plot_fill(c, plot_rgb_make(255, 255, 255));
    return 0;
}

static void plot_canvas_free(plot_canvas *c) { free(c->pix); c->pix = NULL; c->w = 0; c->h = 0; }

// straight line from (x0,y0) to (x1,y1), both ends included (Bresenham), `width` px thick (square pen)
static void plot_line(plot_canvas *c, int x0, int y0, int x1, int y1, int width, plot_rgb col) {
    const int lim = 1 << 20;  // guards the loop against absurd coordinates
    if (abs(x0) > lim || abs(y0) > lim || abs(x1) > lim || abs(y1) > lim) return;
    if (width < 1) width = 1;
    int off = (width - 1) / 2;
    int dx = abs(x1 - x0), sx = x0 < x1 ? 1 : -1;
    int dy = -abs(y1 - y0), sy = y0 < y1 ? 1 : -1;
    int err = dx + dy;
    for (;;) {
        plot_fill_rect(c, x0 - off, y0 - off, x0 - off + width, y0 - off + width, col);
        if (x0 == x1 && y0 == y1) break;
        int e2 = 2 * err;
        if (e2 >= dy) { err += dy; x0 += sx; }
        if (e2 <= dx) { err += dx; y0 += sy; }
    }
}

// 1 px outline of the rectangle [x0, x1) x [y0, y1)
static void plot_rect_outline(plot_canvas *c, int x0, int y0, int x1, int y1, plot_rgb col) {
    plot_fill_rect(c, x0, y0, x1, y0 + 1, col);
    plot_fill_rect(c, x0, y1 - 1, x1, y1, col);
    plot_fill_rect(c, x0, y0, x0 + 1, y1, col);
    plot_fill_rect(c, x1 - 1, y0, x1, y1, col);
}

// Text. stb_easy_font glyphs are 7 units tall above the baseline (descenders reach 9), lines are 12
// units apart, and one unit becomes `scale` px: scale 2 is the normal size here, 3 for titles.
static int plot_cap_height(int scale) { return 7 * scale; }   /* stb_easy_font capitals are 7 px */

static char plot_text_char(char ch) { return (ch >= 32 && ch < 127) ? ch : '?'; }

static int plot_glyph_advance(char ch) {
    char s[2] = {plot_text_char(ch), 0};
    return stb_easy_font_width(s);
}

// draws one glyph; up = 0: upright with its top-left at (x, y); up = 1: rotated 90 degrees
// counter-clockwise (reads bottom to top) with the start of its baseline side at (x, y). Returns the advance.
static int plot_glyph(plot_canvas *c, int x, int y, char ch, int scale, plot_rgb col, int up) {
    char s[2] = {plot_text_char(ch), 0};
    float vb[16 * 64];  // a quad is 4 vertices of 16 bytes (x, y, z, rgba); a glyph has at most ~12 quads
    int nq = stb_easy_font_print(0.0f, 0.0f, s, NULL, vb, (int)sizeof vb);
    for (int q = 0; q < nq; q++) {
        const float *v0 = vb + q * 16, *v2 = vb + q * 16 + 8;  // vertices 0 and 2 are opposite corners
        int u0 = (int)v0[0], t0 = (int)v0[1], u1 = (int)v2[0], t1 = (int)v2[1];
        if (!up) plot_fill_rect(c, x + u0 * scale, y + t0 * scale, x + u1 * scale, y + t1 * scale, col);
        else plot_fill_rect(c, x + t0 * scale, y - u1 * scale, x + t1 * scale, y - u0 * scale, col);
    }
    return stb_easy_font_width(s) * scale;
}

// width in px of the ink of the widest line of s (printable ASCII; others are drawn as '?')
static int plot_text_width(const char *s, int scale) {
    int w = 0, maxw = 0;
    for (; *s; s++) {
        if (*s == '\n') { w = 0; continue; }
        w += plot_glyph_advance(*s) * scale;
        if (w - scale > maxw) maxw = w - scale;  // the last glyph's 1-unit right bearing is not ink
    }
    return maxw;
}

// draws s with its top-left corner at (x, y); '\n' starts a new line. Returns plot_text_width(s, scale).
static int plot_text(plot_canvas *c, int x, int y, const char *s, int scale, plot_rgb col) {
    int cx = x;
    for (const char *p = s; *p; p++) {
        if (*p == '\n') { cx = x; y += 12 * scale; continue; }
        cx += plot_glyph(c, cx, y, *p, scale, col, 0);
    }
    return plot_text_width(s, scale);
}

// draws s rotated 90 degrees counter-clockwise (for a y-axis label), reading upwards from (x, y);
// the glyphs occupy x .. x + plot_cap_height(scale). No '\n'. Returns plot_text_width(s, scale).
static int plot_text_up(plot_canvas *c, int x, int y, const char *s, int scale, plot_rgb col) {
    for (const char *p = s; *p; p++) y -= plot_glyph(c, x, y, *p, scale, col, 1);
    return plot_text_width(s, scale);
}

// centred horizontally on cx; y is the top
static void plot_text_centered(plot_canvas *c, int cx, int y, const char *s, int scale, plot_rgb col) {
    plot_text(c, cx - plot_text_width(s, scale) / 2, y, s, scale, col);
}

// writes the canvas as an RGB PNG; 0 on success, -1 (with a message) on failure
static int plot_write_png(const plot_canvas *c, const char *path) {
    errno = 0;
    if (!stbi_write_png(path, c->w, c->h, 3, c->pix, c->w * 3)) {
        fprintf(stderr, "plot: cannot write PNG '%s'%s%s\n", path, errno ? ": " : "", errno ? strerror(errno) : "");
        return -1;
    }
    return 0;
}

// ----------------------------------------------------------------------------
// axes and number formatting

// An axis: the range [lo, hi] (log10 scale if log), labelled ticks t[] and unlabelled minor ticks m[].
typedef struct {
    double lo, hi;
    int log;
    int nt, nm;
    double t[PLOT_MAX_TICKS], m[PLOT_MAX_TICKS];
    double step;  // tick spacing for linear labels (log axes: 0, each label formats itself)
} plot_axis;

// smallest 1, 2 or 5 x 10^k that is >= x (x > 0)
static double plot_nice_ceil(double x) {
    double mag = pow(10.0, floor(log10(x)));
    double f = x / mag;
    double nf = f <= 1.0 + 1e-9 ? 1.0 : f <= 2.0 + 1e-9 ? 2.0 : f <= 5.0 + 1e-9 ? 5.0 : 10.0;
    return nf * mag;
}

// Formats a tick value. step > 0 is the spacing of neighbouring labels and sets the number of
// decimals (zero too: "0.00"); 0 < |v| < 1e-4 or |v| >= 1e6 use the form 2.5e6 / 1e-5.
static void plot_fmt_tick(char *buf, size_t sz, double v, double step) {
    if (fabs(v) < step * 1e-6) v = 0.0;  // rounding noise of a tick at zero
    double av = fabs(v);
    if (av == 0.0 && (step < 1e-4 || step >= 1e6)) { snprintf(buf, sz, "0"); return; }
    if (av == 0.0 || (av >= 1e-4 && av < 1e6)) {
        int dec = step >= 1.0 ? 0 : (int)ceil(-log10(step) - 1e-6);
        if (dec > 8) dec = 8;
        snprintf(buf, sz, "%.*f", dec, v);
        return;
    }
    int dig = (int)floor(log10(av) + 1e-9) - (int)floor(log10(step) + 1e-9);
    if (dig < 0) dig = 0;
    if (dig > 6) dig = 6;
    char tmp[48];
    snprintf(tmp, sizeof tmp, "%.*e", dig, v);  // e.g. 2.5e+06 -> 2.5e6, 1e-05 -> 1e-5
    char *e = strchr(tmp, 'e');
    size_t o = 0;
    for (char *p = tmp; *p && o + 1 < sz; p++) {
        if (e != NULL && p > e && (*p == '+' || (*p == '0' && (p[-1] == 'e' || p[-1] == '-' || p[-1] == '+'))))
            continue;  // drop '+' and leading exponent zeros
        buf[o++] = *p;
    }
    buf[o] = 0;
}

static void plot_axis_label(const plot_axis *a, int i, char *buf, size_t sz) {
    plot_fmt_tick(buf, sz, a->t[i], a->step > 0 ? a->step : a->t[i]);
}

// linear axis covering [lo, hi], widened to a multiple of a 1/2/5 x 10^k step, about `target` intervals
static void plot_axis_linear(plot_axis *a, double lo, double hi, int target) {
    if (!(lo <= hi)) { lo = 0.0; hi = 1.0; }  // no data
    if (hi - lo <= 1e-9 * fmax(fabs(lo), fabs(hi))) {  // constant data
        double d = lo != 0.0 ? 0.1 * fabs(lo) : 1.0;
        lo -= d; hi += d;
    }
    if (target < 1) target = 1;
    double step = plot_nice_ceil((hi - lo) / target);
    a->log = 0;
    a->step = step;
    a->lo = floor(lo / step + 1e-9) * step;
    a->hi = ceil(hi / step - 1e-9) * step;
    a->nt = 0;
    a->nm = 0;
    for (double k = round(a->lo / step); k * step <= a->hi + step * 1e-6 && a->nt < PLOT_MAX_TICKS; k += 1.0)
        a->t[a->nt++] = k * step;
}

// log10 axis covering [lo, hi] (both > 0). Spans of a decade or more are widened to whole decades and
// labelled at 10^k (with 2 and 5 x 10^k, or every few decades, to get 3..8 labels); shorter spans get a
// small margin and labels at 1..9 x 10^k, or linear 1/2/5 ticks if those are too few.
static void plot_axis_log(plot_axis *a, double lo, double hi) {
    if (!(lo > 0.0 && lo <= hi)) { lo = 1.0; hi = 10.0; }
    double l0 = log10(lo), l1 = log10(hi);
    if (l1 - l0 < 1e-9) { l0 -= 0.5; l1 += 0.5; }
    int decades = l1 - l0 >= 1.0;
    if (decades) { l0 = floor(l0 + 1e-9); l1 = ceil(l1 - 1e-9); }
    else { double p = 0.05 * (l1 - l0); l0 -= p; l1 += p; }
    a->log = 1;
    a->lo = pow(10.0, l0);
    a->hi = pow(10.0, l1);
    a->step = 0.0;
    static const double sets[3][10] = {{1}, {1, 2, 5}, {1, 2, 3, 4, 5, 6, 7, 8, 9}};
    static const int setn[3] = {1, 3, 9};
    int ndec = (int)(l1 - l0 + 0.5);
    int every = ndec > 8 ? (ndec + 7) / 8 : 1;  // label every `every`-th decade
    for (int s = 0; s < 3; s++) {
        a->nt = 0;
        a->nm = 0;
        for (int e = (int)floor(l0) ; e <= (int)ceil(l1); e++) {
            for (int j = 1; j <= 9; j++) {
                double v = j * pow(10.0, e);
                if (v < a->lo * (1 - 1e-9) || v > a->hi * (1 + 1e-9)) continue;
                int lab = 0;
                for (int q = 0; q < setn[s]; q++) lab |= sets[s][q] == j;
                if (j == 1 && (e - (int)floor(l0)) % every != 0) lab = 0;
                if (lab && a->nt < PLOT_MAX_TICKS) a->t[a->nt++] = v;
                else if (!lab && ndec <= 6 && a->nm < PLOT_MAX_TICKS) a->m[a->nm++] = v;
            }
        }
        if (a->nt >= 3 || (decades && s == 1)) return;
    }
    if (a->nt >= 2) return;
    // too narrow for 1..9 x 10^k: linear 1/2/5 ticks inside [lo, hi], placed on the log scale
    double step = plot_nice_ceil((a->hi - a->lo) / 4.0);
    a->step = step;
    a->nt = 0;
    a->nm = 0;
    for (double k = ceil(a->lo / step - 1e-9); k * step <= a->hi * (1 + 1e-9) && a->nt < PLOT_MAX_TICKS; k += 1.0)
        a->t[a->nt++] = k * step;
}

// position of v along the axis, 0 at lo, 1 at hi
static double plot_axis_frac(const plot_axis *a, double v) {
    if (a->log) return (log10(v) - log10(a->lo)) / (log10(a->hi) - log10(a->lo));
    return (v - a->lo) / (a->hi - a->lo);
}

// ----------------------------------------------------------------------------
// line chart

typedef struct { int x0, y0, w, h; plot_axis xa, ya; } plot_frame;  // plot area in px + axes

static int plot_px(const plot_frame *f, double x) { return f->x0 + (int)lround(plot_axis_frac(&f->xa, x) * (f->w - 1)); }
static int plot_py(const plot_frame *f, double y) { return f->y0 + f->h - 1 - (int)lround(plot_axis_frac(&f->ya, y) * (f->h - 1)); }

static int plot_point_ok(const plot_series *s, int i, int logy, double *x, double *y) {
    *x = s->x ? (double)s->x[i] : (double)i;
    *y = (double)s->y[i];
    return isfinite(*x) && isfinite(*y) && (!logy || *y > 0.0);
}

// how much of the series' drawn path (sampled every ~4 px) falls inside the px box [x0,x1) x [y0,y1)
static int plot_path_hits(const plot_frame *f, const plot_series *ss, int ns, int x0, int y0, int x1, int y1) {
    int hits = 0;
    for (int k = 0; k < ns; k++) {
        int havep = 0, px = 0, py = 0;
        for (int i = 0; i < ss[k].n; i++) {
            double x, y;
            if (!plot_point_ok(&ss[k], i, f->ya.log, &x, &y)) continue;
            int qx = plot_px(f, x), qy = plot_py(f, y);
            int len = havep && ss[k].width >= 0 ? abs(qx - px) + abs(qy - py) : 0;
            int steps = len / 4 + 1;
            for (int j = 1; j <= steps; j++) {
                int sx = havep ? px + (qx - px) * j / steps : qx, sy = havep ? py + (qy - py) * j / steps : qy;
                hits += sx >= x0 && sx < x1 && sy >= y0 && sy < y1;
            }
            havep = 1; px = qx; py = qy;
        }
    }
    return hits;
}

static void plot_draw_legend(plot_canvas *c, const plot_frame *f, const plot_series *ss, int ns) {
    const int ts = 2, pad = 10, sample = 30, rowh = 24;
    int rows = 0, tw = 0;
    for (int k = 0; k < ns; k++) {
        if (ss[k].name == NULL) continue;
        rows++;
        int w = plot_text_width(ss[k].name, ts);
        if (w > tw) tw = w;
    }
    if (rows == 0) return;
    int bw = pad + sample + 8 + tw + pad, bh = pad + rows * rowh - (rowh - plot_cap_height(ts)) + pad;
    // corners: top-right, top-left, bottom-right, bottom-left; the one crossed least by the data wins
    int besthits = -1, bx = 0, by = 0;
    for (int corner = 0; corner < 4; corner++) {
        int x = corner % 2 == 0 ? f->x0 + f->w - 10 - bw : f->x0 + 10;
        int y = corner < 2 ? f->y0 + 10 : f->y0 + f->h - 10 - bh;
        int hits = plot_path_hits(f, ss, ns, x, y, x + bw, y + bh);
        if (besthits < 0 || hits < besthits) { besthits = hits; bx = x; by = y; }
    }
    plot_fill_rect(c, bx, by, bx + bw, by + bh, plot_rgb_make(255, 255, 255));
    plot_rect_outline(c, bx, by, bx + bw, by + bh, plot_rgb_make(160, 160, 160));
    int y = by + pad;
    for (int k = 0; k < ns; k++) {
        if (ss[k].name == NULL) continue;
        int cy = y + plot_cap_height(ts) / 2;
        int lw = ss[k].width == 0 ? 2 : ss[k].width;
        if (lw > 0) plot_line(c, bx + pad, cy, bx + pad + sample, cy, lw < 3 ? 3 : lw, ss[k].color);
        if (ss[k].marker) plot_fill_rect(c, bx + pad + sample / 2 - 3, cy - 3, bx + pad + sample / 2 + 4, cy + 4, ss[k].color);
        plot_text(c, bx + pad + sample + 8, y, ss[k].name, ts, plot_rgb_make(20, 20, 20));
        y += rowh;
    }
}

// Line chart of `ns` series written to `path` (PLOT_LINES_W x PLOT_LINES_H px). title, xlabel and
// ylabel may be NULL. logy != 0: log10 y axis (points with y <= 0 are skipped). Axis ranges cover all
// valid points; ticks are 1/2/5 x 10^k. Returns 0, or -1 (with a message) on failure.
static int plot_lines(const char *path, const char *title, const char *xlabel, const char *ylabel,
               const plot_series *series, int ns, int logy) {
    const int ts = 2;  // text scale of labels and ticks
    const plot_rgb ink = plot_rgb_make(20, 20, 20), grid = plot_rgb_make(228, 228, 228), minor = plot_rgb_make(243, 243, 243);
    plot_canvas c;
    if (plot_canvas_init(&c, PLOT_LINES_W, PLOT_LINES_H) != 0) return -1;

    double xlo = INFINITY, xhi = -INFINITY, ylo = INFINITY, yhi = -INFINITY;
    for (int k = 0; k < ns; k++) {
        for (int i = 0; i < series[k].n; i++) {
            double x, y;
            if (!plot_point_ok(&series[k], i, logy, &x, &y)) continue;
            xlo = fmin(xlo, x); xhi = fmax(xhi, x); ylo = fmin(ylo, y); yhi = fmax(yhi, y);
        }
    }

    // layout: the y axis first (its labels set the left margin), then the x axis in the remaining width
    plot_frame f;
    char buf[64];
    f.y0 = title ? 62 : 24;
    f.h = PLOT_LINES_H - f.y0 - (xlabel ? 78 : 50);
    if (logy) plot_axis_log(&f.ya, ylo, yhi);
    else {
        for (int target = 8; target >= 2; target--) {  // largest count with >= 40 px between labels
            plot_axis_linear(&f.ya, ylo, yhi, target);
            if (f.ya.nt < 2 || (f.h - 1) / (f.ya.nt - 1) >= 40) break;
        }
    }
    int ylw = 0;
    for (int i = 0; i < f.ya.nt; i++) {
        plot_axis_label(&f.ya, i, buf, sizeof buf);
        int w = plot_text_width(buf, ts);
        if (w > ylw) ylw = w;
    }
    f.x0 = 14 + (ylabel ? plot_cap_height(ts) + 16 : 0) + ylw + 8 + 6;
    f.w = PLOT_LINES_W - f.x0 - 40;
    for (int target = 10; target >= 1; target--) {  // largest count whose labels keep 24 px apart
        plot_axis_linear(&f.xa, xlo, xhi, target);
        int xlw = 0;
        for (int i = 0; i < f.xa.nt; i++) {
            plot_axis_label(&f.xa, i, buf, sizeof buf);
            int w = plot_text_width(buf, ts);
            if (w > xlw) xlw = w;
        }
        if (f.xa.nt < 2 || (f.w - 1) / (f.xa.nt - 1) >= xlw + 24) break;
    }

    // grid, zero line, data
    int xb = f.x0 + f.w, yb = f.y0 + f.h;  // one past the plot area
    for (int i = 0; i < f.ya.nm; i++) plot_fill_rect(&c, f.x0, plot_py(&f, f.ya.m[i]), xb, plot_py(&f, f.ya.m[i]) + 1, minor);
    for (int i = 0; i < f.ya.nt; i++) plot_fill_rect(&c, f.x0, plot_py(&f, f.ya.t[i]), xb, plot_py(&f, f.ya.t[i]) + 1, grid);
    for (int i = 0; i < f.xa.nt; i++) plot_fill_rect(&c, plot_px(&f, f.xa.t[i]), f.y0, plot_px(&f, f.xa.t[i]) + 1, yb, grid);
    if (!logy && f.ya.lo < 0.0 && f.ya.hi > 0.0) plot_fill_rect(&c, f.x0, plot_py(&f, 0.0), xb, plot_py(&f, 0.0) + 1, plot_rgb_make(120, 120, 120));
    for (int k = 0; k < ns; k++) {
        const plot_series *s = &series[k];
        int lw = s->width == 0 ? 2 : s->width, havep = 0, px = 0, py = 0;
        for (int i = 0; i < s->n; i++) {
            double x, y;
            if (!plot_point_ok(s, i, logy, &x, &y)) continue;
            int qx = plot_px(&f, x), qy = plot_py(&f, y);
            if (lw > 0 && havep) plot_line(&c, px, py, qx, qy, lw, s->color);
            if (lw > 0 && !havep) plot_line(&c, qx, qy, qx, qy, lw, s->color);  // a lone first point
            if (s->marker) plot_fill_rect(&c, qx - 3, qy - 3, qx + 4, qy + 4, s->color);
            havep = 1; px = qx; py = qy;
        }
    }

    // frame, ticks and their labels
    plot_rect_outline(&c, f.x0 - 1, f.y0 - 1, xb + 1, yb + 1, ink);
    for (int i = 0; i < f.ya.nm; i++) plot_fill_rect(&c, f.x0 - 4, plot_py(&f, f.ya.m[i]), f.x0 - 1, plot_py(&f, f.ya.m[i]) + 1, ink);
    for (int i = 0; i < f.ya.nt; i++) {
        int y = plot_py(&f, f.ya.t[i]);
        plot_fill_rect(&c, f.x0 - 7, y, f.x0 - 1, y + 1, ink);
        plot_axis_label(&f.ya, i, buf, sizeof buf);
        plot_text(&c, f.x0 - 8 - 6 - plot_text_width(buf, ts), y - plot_cap_height(ts) / 2, buf, ts, ink);
    }
    for (int i = 0; i < f.xa.nt; i++) {
        int x = plot_px(&f, f.xa.t[i]);
        plot_fill_rect(&c, x, yb + 1, x + 1, yb + 7, ink);
        plot_axis_label(&f.xa, i, buf, sizeof buf);
        plot_text_centered(&c, x, yb + 12, buf, ts, ink);
    }

    // axis labels, title, legend
    if (xlabel) plot_text_centered(&c, f.x0 + f.w / 2, yb + 12 + plot_cap_height(ts) + 22, xlabel, ts, ink);
    if (ylabel) plot_text_up(&c, 14, f.y0 + f.h / 2 + plot_text_width(ylabel, ts) / 2, ylabel, ts, ink);
    if (title) plot_text_centered(&c, f.x0 + f.w / 2, 22, title, 3, ink);
    plot_draw_legend(&c, &f, series, ns);

    int rc = plot_write_png(&c, path);
    plot_canvas_free(&c);
    return rc;
}

// ----------------------------------------------------------------------------
// heatmaps

// colormap at t in [0, 1]: sequential white -> dark blue ("Blues"), or diverging blue -> white -> red
static plot_rgb plot_cmap(double t, int diverging) {
    static const unsigned char seq[5][3] = {{247, 251, 255}, {198, 219, 239}, {107, 174, 214}, {33, 113, 181}, {8, 48, 107}};
    static const unsigned char div[5][3] = {{5, 48, 97}, {67, 147, 195}, {247, 247, 247}, {214, 96, 77}, {103, 0, 31}};
    const unsigned char (*st)[3] = diverging ? div : seq;
    if (!(t >= 0.0)) t = 0.0;  // also NaN
    if (t > 1.0) t = 1.0;
    int i = t >= 1.0 ? 3 : (int)(t * 4.0);
    float u = (float)(t * 4.0 - i);
    return plot_mix(plot_rgb_make(st[i][0], st[i][1], st[i][2]), plot_rgb_make(st[i + 1][0], st[i + 1][1], st[i + 1][2]), u);
}

// cell text: 2 decimals below 1000, then whole numbers, then 1.2e7
static void plot_fmt_cell(char *buf, size_t sz, double v) {
    if (!isfinite(v)) snprintf(buf, sz, isnan(v) ? "nan" : v > 0 ? "inf" : "-inf");
    else if (fabs(v) < 0.005) snprintf(buf, sz, "0.00");  // no "-0.00"
    else if (fabs(v) < 999.995) snprintf(buf, sz, "%.2f", v);
    else if (fabs(v) < 999999.5) snprintf(buf, sz, "%.0f", v);
    else plot_fmt_tick(buf, sz, v, pow(10.0, floor(log10(fabs(v))) - 1.0));
}

// v rounded away from zero to 2 significant digits (colour bar ends)
static double plot_round2(double v) {
    if (v == 0.0 || !isfinite(v)) return v;
    double mag = pow(10.0, floor(log10(fabs(v))) - 1.0);
    return (v > 0 ? ceil(v / mag - 1e-9) : floor(v / mag + 1e-9)) * mag;
}

typedef struct { double lo, hi; int diverging, cell_scale, sum_scale; } plot_hm_panel;

// Heatmaps of k n x n matrices (mats: k row-major n*n blocks, panel p at mats + p*n*n), laid out in
// up to 3 columns (k = 4: 2 x 2, k = 5 or 6: 2 rows of 3). Each panel has its subtitle (subtitles may be
// NULL, and so may each entry), the value in every cell, row sums right of the rows, column sums under
// the columns, and its own colour bar: sequential on [0, 1] when all values lie there (H_res of mhc),
// sequential on [0, max] when non-negative, else diverging on [-m, m]. The image size follows from k
// and n (about 1600 x 900 for k = 6, n = 4). Returns 0, or -1 (with a message) on failure.
static int plot_heatmaps(const char *path, const char *title, const float *mats, int k, int n, const char *const *subtitles) {
    if (k < 1 || n < 1 || n > 32) {
        fprintf(stderr, "plot: plot_heatmaps needs k >= 1 panels of n x n with 1 <= n <= 32 (got k=%d, n=%d)\n", k, n);
        return -1;
    }
    const plot_rgb ink = plot_rgb_make(20, 20, 20), faint = plot_rgb_make(110, 110, 110);
    const int cs = n <= 4 ? 80 : n <= 6 ? 64 : 56;  // cell size in px
    const int lm = 50;                               // panel left margin: row indices and "sum"
    const int mtop = 52;                             // matrix top below the panel top: subtitle, column indices
    plot_hm_panel *pp = (plot_hm_panel *)malloc((size_t)k * sizeof *pp);
    if (pp == NULL) { fprintf(stderr, "plot: out of memory\n"); return -1; }

    // per-panel colour scale and text sizes; shared column widths
    char buf[64];
    int rsw = plot_text_width("sum", 2), cbw = 0;
    for (int p = 0; p < k; p++) {
        const float *A = mats + (size_t)p * n * n;
        double lo = INFINITY, hi = -INFINITY;
        for (int i = 0; i < n * n; i++) if (isfinite(A[i])) { lo = fmin(lo, A[i]); hi = fmax(hi, A[i]); }
        plot_hm_panel *q = &pp[p];
        if (!(lo <= hi)) { lo = 0.0; hi = 1.0; }
        q->diverging = lo < 0.0;
        if (lo >= 0.0 && hi <= 1.0) { q->lo = 0.0; q->hi = 1.0; }
        else if (lo >= 0.0) { q->lo = 0.0; q->hi = plot_round2(hi); }
        else { double m = plot_round2(fmax(-lo, hi)); q->lo = -m; q->hi = m; }
        int cellw = 0, sumw = 0;
        for (int i = 0; i < n; i++) {
            double rs = 0.0, cl = 0.0;
            for (int j = 0; j < n; j++) {
                rs += A[i * n + j]; cl += A[j * n + i];
                plot_fmt_cell(buf, sizeof buf, A[i * n + j]);
                int w = plot_text_width(buf, 1);
                if (w > cellw) cellw = w;
            }
            plot_fmt_cell(buf, sizeof buf, rs);
            int w = plot_text_width(buf, 1);
            if (w > sumw) sumw = w;
            plot_fmt_cell(buf, sizeof buf, cl);
            w = plot_text_width(buf, 1);
            if (w > sumw) sumw = w;
        }
        q->cell_scale = 2 * cellw <= cs - 12 ? 2 : 1;  // scale 2 if it leaves >= 6 px either side
        q->sum_scale = 2 * sumw <= cs - 12 ? 2 : 1;
        if (q->sum_scale * sumw > rsw) rsw = q->sum_scale * sumw;
        double cbv[3] = {q->lo, 0.5 * (q->lo + q->hi), q->hi};
        for (int i = 0; i < 3; i++) {
            plot_fmt_tick(buf, sizeof buf, cbv[i], (q->hi - q->lo) / 2);
            int w2 = plot_text_width(buf, 2);
            if (w2 > cbw) cbw = w2;
        }
    }
    const int cbx = lm + n * cs + 14 + rsw + 22;         // colour bar x within a panel
    const int pw = cbx + 16 + 6 + cbw + 36;              // panel width incl. gap
    const int ph = mtop + n * cs + 10 + 14 + 40;         // panel height incl. gap
    const int ncol = k <= 3 ? k : (k + 1) / 2 <= 3 ? (k + 1) / 2 : 3, nrow = (k + ncol - 1) / ncol;
    const int top = title ? 64 : 20, left = 16;

    plot_canvas c;
    if (plot_canvas_init(&c, left + ncol * pw, top + nrow * ph) != 0) { free(pp); return -1; }
    if (title) plot_text_centered(&c, c.w / 2, 22, title, 3, ink);
    for (int p = 0; p < k; p++) {
        const float *A = mats + (size_t)p * n * n;
        const plot_hm_panel *q = &pp[p];
        int ox = left + (p % ncol) * pw, oy = top + (p / ncol) * ph;
        int mx = ox + lm, my = oy + mtop, mw = n * cs;
        if (subtitles && subtitles[p]) plot_text_centered(&c, mx + mw / 2, oy, subtitles[p], 2, ink);
        for (int i = 0; i < n; i++) {  // stream indices
            snprintf(buf, sizeof buf, "%d", i);
            plot_text_centered(&c, mx + i * cs + cs / 2, my - 8 - plot_cap_height(2), buf, 2, faint);
            plot_text(&c, mx - 10 - plot_text_width(buf, 2), my + i * cs + cs / 2 - plot_cap_height(2) / 2, buf, 2, faint);
        }
        for (int i = 0; i < n; i++) {
            for (int j = 0; j < n; j++) {
                double v = A[i * n + j];
                plot_rgb col = isfinite(v) ? plot_cmap((v - q->lo) / (q->hi - q->lo), q->diverging) : plot_rgb_make(200, 200, 200);
                int x0 = mx + j * cs, y0 = my + i * cs;
                plot_fill_rect(&c, x0, y0, x0 + cs - 1, y0 + cs - 1, col);  // 1 px white gap between cells
                int lum = (299 * col.r + 587 * col.g + 114 * col.b) / 1000;
                plot_fmt_cell(buf, sizeof buf, v);
                plot_text_centered(&c, x0 + cs / 2, y0 + cs / 2 - plot_cap_height(q->cell_scale) / 2, buf, q->cell_scale,
                                   lum < 120 ? plot_rgb_make(255, 255, 255) : ink);
            }
        }
        // row sums (right) and column sums (below), on a light grey band
        const plot_rgb band = plot_rgb_make(240, 240, 240);
        int rx = mx + mw + 14, sy = my + mw + 10;
        int ss = q->sum_scale;
        plot_fill_rect(&c, rx - 6, my, rx + rsw + 6, my + mw - 1, band);
        plot_fill_rect(&c, mx, sy - 5, mx + mw - 1, sy + plot_cap_height(2) + 5, band);
        plot_text(&c, rx + (rsw - plot_text_width("sum", 2)) / 2, my - 8 - plot_cap_height(2), "sum", 2, faint);
        plot_text(&c, mx - 10 - plot_text_width("sum", 2), sy, "sum", 2, faint);
        for (int i = 0; i < n; i++) {
            double rs = 0.0, cl = 0.0;
            for (int j = 0; j < n; j++) { rs += A[i * n + j]; cl += A[j * n + i]; }
            plot_fmt_cell(buf, sizeof buf, rs);
            plot_text(&c, rx + rsw - plot_text_width(buf, ss), my + i * cs + cs / 2 - plot_cap_height(ss) / 2, buf, ss, ink);
            plot_fmt_cell(buf, sizeof buf, cl);
            plot_text_centered(&c, mx + i * cs + cs / 2, sy + (plot_cap_height(2) - plot_cap_height(ss)) / 2, buf, ss, ink);
        }
        // colour bar, labelled at its top, middle and bottom (no tick marks: they would read as '-')
        int bx = ox + cbx;
        for (int y = 0; y < mw; y++)
            plot_fill_rect(&c, bx, my + y, bx + 16, my + y + 1, plot_cmap(1.0 - (double)y / (mw - 1), q->diverging));
        plot_rect_outline(&c, bx - 1, my - 1, bx + 17, my + mw + 1, faint);
        double cbv[3] = {q->hi, 0.5 * (q->lo + q->hi), q->lo};
        int cby[3] = {my, my + mw / 2 - plot_cap_height(2) / 2, my + mw - plot_cap_height(2)};
        for (int i = 0; i < 3; i++) {
            plot_fmt_tick(buf, sizeof buf, cbv[i], (q->hi - q->lo) / 2);
            plot_text(&c, bx + 22, cby[i], buf, 2, ink);
        }
    }
    free(pp);
    int rc = plot_write_png(&c, path);
    plot_canvas_free(&c);
    return rc;
}

/* =============================================================================================
   Options                                                                                        */
#define MAX_SHARDS 64
#define MAX_SET 64

typedef struct {
    MhcConfig cfg;
    const char *set_names[MAX_SET];  /* config fields set on the command line (checked against a resumed run) */
    int n_set;
    char *train_files[MAX_SHARDS], *val_files[MAX_SHARDS];
    int n_train, n_val;
    const char *out_dir;
    int eval_every, eval_batches, ckpt_every, threads, dry_run, resume, stop_after, bench;
    int grad_accum;           /* micro-batches per step: forward + backward of batch/grad_accum sequences each */
    int precision;            /* index into precision_names: GEMM precision (GPU build)               */
    int recompute;            /* GPU build: --recompute (mhc_gpu_set_recompute)                       */
    int wgmma;                /* GPU build, bf16: WGMMA_* bits of --expert-wgmma, --attention-wgmma   */
    uint64_t seed;
} Options;

/* --precision values; the order is mhc_cuda.cuh's MHC_PREC_FP32, MHC_PREC_TF32, MHC_PREC_BF16 */
static const char *const precision_names[] = {"fp32", "tf32", "bf16"};

/* Options.wgmma's bits, for mhc_cuda.cuh's MHC_WGMMA_EXPERTS and MHC_WGMMA_ATTENTION (trainer_start; the CPU
   build has no mhc_cuda.cuh) */
enum { WGMMA_EXPERTS = 1, WGMMA_ATTENTION = 2 };

/* flags that name one config field */
static const char *const flag_fields[][2] = {
    {"--residual", "residual"}, {"--streams", "hc_mult"}, {"--sinkhorn-iters", "sinkhorn_iters"},
    {"--init", "mhc_init"}, {"--batch", "batch_size"}, {"--seq-len", "seq_len"}, {"--steps", "steps"},
    {"--lr", "lr"}, {"--schedule", "lr_schedule"}, {"--warmup", "warmup_steps"},
    {"--weight-decay", "weight_decay"}, {"--clip", "grad_clip"}, {NULL, NULL}};

static void usage(void) {
    printf("usage: ./train [flags]\n"
           "  --preset NAME          tiny | small | 3b | 9b | 27b (default tiny)\n"
           "  --residual MODE        plain | hc | mhc (default mhc)\n"
           "  --streams N            residual streams n (hc_mult, default 4; plain forces 1)\n"
           "  --sinkhorn-iters N     Sinkhorn-Knopp iterations (default 20)\n"
           "  --init KIND            mHC init: identity | uniform (default identity)\n"
           "  --batch N              sequences per step        --seq-len N     tokens per sequence\n"
           "  --grad-accum K         run each step as K micro-batches of N/K sequences (same gradient, 1/K the\n"
           "                         activation memory)\n"
           "  --steps N              optimizer steps           --lr X          peak learning rate\n"
           "  --schedule KIND        step | cosine             --warmup N      warmup steps\n"
           "  --weight-decay X       AdamW decay (2-D weights)  --clip X        global grad-norm clip\n"
           "  --set FIELD=VALUE      any config field by its SPEC name (e.g. --set d_model=256)\n"
           "  --train FILE           training shard (repeatable; default data/sotu_train.bin)\n"
           "  --val FILE             validation shard (repeatable; default data/sotu_val.bin)\n"
           "  --eval-every N         validation + plots every N steps (default 50)\n"
           "  --eval-batches N       validation batches per evaluation (default 4)\n"
           "  --ckpt-every N         checkpoint every N steps (default: at each evaluation)\n"
           "  --out DIR              output directory (default out)\n"
           "  --seed N               initialisation seed (default 1337)\n"
           "  --threads N            OpenMP threads (default: all cores)\n"
           "  --resume               continue the run in --out DIR from its checkpoint\n"
           "  --stop-after N         stop (with a checkpoint) after step N, as if interrupted\n"
           "  --dry-run              print config, parameters, FLOPs and memory; allocate nothing\n"
           "  --bench                time the steps only: no evaluation, plots, diagnostics or checkpoints\n"
           "  --precision P          GPU GEMMs: fp32 | tf32 | bf16 (default tf32; bf16: bf16 operands, fp32\n"
           "                         accumulate and master weights, untested on real hardware). The CPU build\n"
           "                         takes only fp32 (it computes in fp32, or fp64 when built so)\n"
           "  --recompute            GPU: keep the residual streams and attention outputs, recompute the rest\n"
           "                         (the logits in chunks) in the backward: the forward's FLOPs again, less\n"
           "                         attention, for far less activation memory (see --dry-run)\n"
           "  --expert-wgmma         GPU, --precision bf16, Hopper: the routed-expert GEMMs on wgmma tiles in\n"
           "                         place of mma.sync (the same sums in another order; not yet run on a GPU)\n"
           "  --attention-wgmma      GPU, --precision bf16, Hopper: the training attention kernels on wgmma\n"
           "                         (the same sums in another order; not yet run on a GPU)\n"
           "  --loss-gap PNG DIR...  plot CE(run) - CE(first run) from finished runs' log.csv\n"
           "  --help\n");
}

static void die(const char *fmt, const char *a, const char *b) {
    fprintf(stderr, "train: ");
    fprintf(stderr, fmt, a, b);
    fprintf(stderr, "\n");
    exit(2);
}

static int parse_int(const char *s, int lo, int *out) {
    char *end;
    errno = 0;
    long v = strtol(s, &end, 10);
    if (errno || end == s || *end || v < lo || v > 2000000000L) return -1;
    *out = (int)v;
    return 0;
}

static void set_field(Options *o, const char *flag, const char *name, const char *value) {
    if (mhc_config_set(&o->cfg, name, value)) die("bad value '%s' for %s", value, flag);
    if (o->n_set < MAX_SET) o->set_names[o->n_set++] = name;
}

static void parse_args(Options *o, int argc, char **argv) {
    const char *preset = "tiny";
    for (int i = 1; i < argc; i++)              /* the preset first: the other flags override it */
        if (!strcmp(argv[i], "--preset") && i + 1 < argc) preset = argv[i + 1];
    memset(o, 0, sizeof *o);
    if (mhc_preset(&o->cfg, preset)) die("unknown preset '%s'%s (tiny small 3b 9b 27b)", preset, "");
    o->out_dir = "out";
    o->eval_every = 50;
    o->eval_batches = 4;
    o->grad_accum = 1;
    o->ckpt_every = -1;
    o->seed = 1337;
#ifdef __CUDACC__
    o->precision = 1;                /* tf32 */
#endif
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        int matched = 0;
        if (!strcmp(a, "--help") || !strcmp(a, "-h")) { usage(); exit(0); }
        if (!strcmp(a, "--dry-run")) { o->dry_run = 1; continue; }
        if (!strcmp(a, "--resume")) { o->resume = 1; continue; }
        if (!strcmp(a, "--bench")) { o->bench = 1; continue; }
        if (!strcmp(a, "--recompute")) {
#ifndef __CUDACC__
            die("--recompute needs the GPU build (make gpu)%s%s", "", "");
#endif
            o->recompute = 1;
            continue;
        }
        if (!strcmp(a, "--expert-wgmma") || !strcmp(a, "--attention-wgmma")) {
#ifndef __CUDACC__
            die("%s needs the GPU build (make gpu)%s", a, "");
#endif
            o->wgmma |= !strcmp(a, "--expert-wgmma") ? WGMMA_EXPERTS : WGMMA_ATTENTION;
            continue;
        }
        int known = !strcmp(a, "--preset") || !strcmp(a, "--set") || !strcmp(a, "--train") || !strcmp(a, "--val") ||
                    !strcmp(a, "--out") || !strcmp(a, "--eval-every") || !strcmp(a, "--eval-batches") ||
                    !strcmp(a, "--ckpt-every") || !strcmp(a, "--threads") || !strcmp(a, "--stop-after") || !strcmp(a, "--seed") ||
                    !strcmp(a, "--grad-accum") || !strcmp(a, "--precision");
        for (int k = 0; flag_fields[k][0]; k++) known |= !strcmp(a, flag_fields[k][0]);
        if (!known) die("unknown flag '%s' (see --help)%s", a, "");
        if (!v) die("%s needs a value%s", a, "");
        for (int k = 0; flag_fields[k][0]; k++)
            if (!strcmp(a, flag_fields[k][0])) { set_field(o, a, flag_fields[k][1], v); matched = 1; }
        if (matched) { i++; continue; }
        if (!strcmp(a, "--preset")) {
        } else if (!strcmp(a, "--set")) {
            char name[64];
            const char *eq = strchr(v, '=');
            if (!eq || eq - v >= (long)sizeof name) die("--set wants FIELD=VALUE, got '%s'%s", v, "");
            memcpy(name, v, (size_t)(eq - v));
            name[eq - v] = 0;
            MhcField f[MHC_MAX_FIELDS];
            int n = mhc_config_fields(&o->cfg, f), found = -1;
            for (int k = 0; k < n; k++) if (!strcmp(f[k].name, name)) found = k;
            if (found < 0) die("--set: unknown config field '%s'%s", name, "");
            set_field(o, "--set", f[found].name, eq + 1);
        } else if (!strcmp(a, "--train")) {
            if (o->n_train == MAX_SHARDS) die("too many --train files%s%s", "", "");
            o->train_files[o->n_train++] = argv[i + 1];
        } else if (!strcmp(a, "--val")) {
            if (o->n_val == MAX_SHARDS) die("too many --val files%s%s", "", "");
            o->val_files[o->n_val++] = argv[i + 1];
        } else if (!strcmp(a, "--out")) {
            o->out_dir = v;
        } else if (!strcmp(a, "--eval-every")) {
            if (parse_int(v, 1, &o->eval_every)) die("bad value '%s' for %s", v, a);
        } else if (!strcmp(a, "--eval-batches")) {
            if (parse_int(v, 1, &o->eval_batches)) die("bad value '%s' for %s", v, a);
        } else if (!strcmp(a, "--ckpt-every")) {
            if (parse_int(v, 1, &o->ckpt_every)) die("bad value '%s' for %s", v, a);
        } else if (!strcmp(a, "--threads")) {
            if (parse_int(v, 1, &o->threads)) die("bad value '%s' for %s", v, a);
        } else if (!strcmp(a, "--grad-accum")) {
            if (parse_int(v, 1, &o->grad_accum)) die("bad value '%s' for %s", v, a);
        } else if (!strcmp(a, "--stop-after")) {
            if (parse_int(v, 1, &o->stop_after)) die("bad value '%s' for %s", v, a);
        } else if (!strcmp(a, "--precision")) {
            o->precision = -1;
            for (int k = 0; k < 3; k++) if (!strcmp(v, precision_names[k])) o->precision = k;
            if (o->precision < 0) die("bad value '%s' for %s (fp32 | tf32 | bf16)", v, a);
#ifndef __CUDACC__
            if (o->precision != 0) die("--precision %s needs the GPU build (make gpu); this CPU build takes only fp32%s", v, "");
#endif
        } else if (!strcmp(a, "--seed")) {
            char *end;
            errno = 0;
            o->seed = strtoull(v, &end, 10);
            if (errno || end == v || *end || *v == '-') die("bad value '%s' for %s", v, a);
        }
        i++;
    }
    if (o->ckpt_every < 0) o->ckpt_every = o->eval_every;
    static char default_train[] = "data/sotu_train.bin", default_val[] = "data/sotu_val.bin";
    if (!o->n_train) o->train_files[o->n_train++] = default_train;
    if (!o->n_val) o->val_files[o->n_val++] = default_val;
    mhc_config_finish(&o->cfg);
    if (o->cfg.batch_size % o->grad_accum) {
        char msg[96];
        snprintf(msg, sizeof msg, "--grad-accum %d does not divide the batch size %d", o->grad_accum, o->cfg.batch_size);
        die("%s%s", msg, "");
    }
    if (o->wgmma && strcmp(precision_names[o->precision], "bf16"))
        die("%s needs --precision bf16%s", o->wgmma & WGMMA_EXPERTS ? "--expert-wgmma" : "--attention-wgmma", "");
}

/* =============================================================================================
   --dry-run: SPEC §13 parameter counts, §15 FLOPs, and the memory a training step needs.        */
static void print_config(MhcConfig *cfg) {
    MhcField f[MHC_MAX_FIELDS];
    int n = mhc_config_fields(cfg, f);
    char buf[64];
    printf("config:\n");
    for (int k = 0; k < n; k++) {
        mhc_config_format(cfg, f[k].name, buf, sizeof buf);
        printf("  %-20s %s\n", f[k].name, buf);
    }
}

static void dry_run(MhcConfig *cfg, int grad_accum, int precision, int recompute) {
    int64_t total, active;
    int M = cfg->batch_size / grad_accum;     /* sequences per forward: what the activations are sized for */
    mhc_count_params(cfg, &total, &active);
    double flops = mhc_flops_per_token(cfg);
    double state = (double)total * sizeof(mhc_real) * 4;   /* params, grads, Adam m and v */
    if (!strcmp(precision_names[precision], "bf16")) state += (double)total * 2;   /* the bf16 copy of the weights */
#ifdef __CUDACC__
    double acts = (double)mhc_gpu_acts_bytes(cfg, M, cfg->seq_len, precision, recompute);   /* what the GPU allocates */
#else
    (void)recompute;
    double acts = (double)mhc_acts_bytes(cfg, M, cfg->seq_len);
#endif
    print_config(cfg);
    printf("parameters: total %lld (%.3fB), active %lld (%.3fB)\n", (long long)total, total / 1e9, (long long)active,
           active / 1e9);
    printf("training FLOPs per token (SPEC §15): %.4g, per step: %.4g\n", flops,
           flops * cfg->batch_size * cfg->seq_len);
    printf("memory (fp32 training as this code does it): weights+grads+AdamW %.2f GiB, activations for %d x %d per forward "
           "(%d micro-batches per step%s): %.2f GiB\n", state / (1 << 30), M, cfg->seq_len, grad_accum,
           recompute ? ", recompute" : "", acts / (1 << 30));
}

/* =============================================================================================
   The trainer: one struct, a CPU and a GPU implementation of its few steps.                      */
typedef struct {
    MhcModel m;
    int micro;                /* sequences per forward: batch_size / grad_accum */
    MhcActs probe;            /* B = 1 forward over the diagnostics probe (CPU) */
    int precision;            /* MHC_PREC_* of the GPU GEMMs (Options.precision) */
    int recompute;            /* Options.recompute */
    int wgmma;                /* Options.wgmma */
#ifdef __CUDACC__
    MhcGpu gpu;
#endif
} Trainer;

static void trainer_start(Trainer *tr, int grad_accum) {
    tr->micro = tr->m.cfg.batch_size / grad_accum;
#ifdef __CUDACC__
    if (mhc_gpu_init(&tr->gpu, &tr->m, tr->micro, tr->m.cfg.seq_len)) exit(1);
    mhc_gpu_set_precision(&tr->gpu, tr->precision);       /* precision_names is in MHC_PREC_* order */
    mhc_gpu_set_recompute(&tr->gpu, tr->recompute);
    int wgmma = (tr->wgmma & WGMMA_EXPERTS ? MHC_WGMMA_EXPERTS : 0) | (tr->wgmma & WGMMA_ATTENTION ? MHC_WGMMA_ATTENTION : 0);
    if (mhc_gpu_set_wgmma(&tr->gpu, wgmma)) exit(1);
#endif
    mhc_acts_create(&tr->probe, &tr->m.cfg, 1, tr->m.cfg.seq_len);
}

/* forward + backward of one batch, as K micro-batches whose gradients add up to the batch mean; returns
   the loss; stream_norm: grad norm over hc.* tensors */
static double trainer_step(Trainer *tr, const int *x, const int *y, double *stream_norm) {
    int M = tr->micro, T = tr->m.cfg.seq_len, K = tr->m.cfg.batch_size / M;
    double loss = 0;
#ifdef __CUDACC__
    mhc_gpu_zero_grad(&tr->gpu);
    for (int k = 0; k < K; k++) {
        loss += mhc_gpu_forward(&tr->gpu, x + (size_t)k * M * T, y + (size_t)k * M * T, M, T) / K;
        mhc_gpu_backward(&tr->gpu);
    }
    if (K > 1) mhc_gpu_scale_grads(&tr->gpu, 1.0 / K);
    *stream_norm = NAN;       /* would need the gradients on the host every step */
    return loss;
#else
    mhc_zero_grad(&tr->m);
    for (int k = 0; k < K; k++) {
        loss += mhc_forward(&tr->m, x + (size_t)k * M * T, y + (size_t)k * M * T, M, T) / K;
        mhc_backward(&tr->m, x + (size_t)k * M * T, y + (size_t)k * M * T);
    }
    if (K > 1) mhc_scale_grads(&tr->m, 1.0 / K);
    double sum = 0;
    for (int k = 0; k < tr->m.n_tensors; k++)
        if (!strncmp(tr->m.tensors[k].name, "hc.", 3))
            for (size_t i = 0; i < tr->m.tensors[k].size; i++) {
                double g = tr->m.grads[tr->m.tensors[k].offset + i];
                sum += g * g;
            }
    *stream_norm = sqrt(sum);
    return loss;
#endif
}

/* clip, AdamW, bias update; returns the pre-clip grad norm */
static double trainer_update(Trainer *tr, double lr) {
#ifdef __CUDACC__
    double norm = mhc_gpu_clip_grad(&tr->gpu, tr->m.cfg.grad_clip);
    mhc_gpu_adamw_step(&tr->gpu, lr);
    mhc_gpu_update_expert_bias(&tr->gpu);
    tr->m.step++;
    return norm;
#else
    double norm = mhc_clip_grad(&tr->m, tr->m.cfg.grad_clip);
    mhc_adamw_step(&tr->m, lr);
    mhc_update_expert_bias(&tr->m);
    return norm;
#endif
}

/* CE of one batch (the mean over its micro-batches, which are the same size) */
static double trainer_eval(Trainer *tr, const int *x, const int *y) {
    int M = tr->micro, T = tr->m.cfg.seq_len, K = tr->m.cfg.batch_size / M;
    double ce = 0;
    for (int k = 0; k < K; k++) {
#ifdef __CUDACC__
        mhc_gpu_forward(&tr->gpu, x + (size_t)k * M * T, y + (size_t)k * M * T, M, T);
        ce += tr->gpu.ce / K;
#else
        mhc_forward(&tr->m, x + (size_t)k * M * T, y + (size_t)k * M * T, M, T);
        ce += tr->m.ce / K;
#endif
    }
    return ce;
}

/* make the host model current (parameters, Adam state, biases, expert loads) */
static void trainer_sync(Trainer *tr) {
#ifdef __CUDACC__
    mhc_gpu_download(&tr->gpu, &tr->m);
#else
    (void)tr;
#endif
}

/* =============================================================================================
   History (log.csv) and plots                                                                   */
typedef struct {
    int n, cap;
    float *step, *loss, *gnorm, *val;   /* val: NaN where no evaluation ran */
} History;

static void history_add(History *h, int step, double loss, double gnorm, double val) {
    if (h->n == h->cap) {
        h->cap = h->cap ? 2 * h->cap : 1024;
        h->step = (float *)realloc(h->step, sizeof(float) * h->cap);
        h->loss = (float *)realloc(h->loss, sizeof(float) * h->cap);
        h->gnorm = (float *)realloc(h->gnorm, sizeof(float) * h->cap);
        h->val = (float *)realloc(h->val, sizeof(float) * h->cap);
        if (!h->step || !h->loss || !h->gnorm || !h->val) { fprintf(stderr, "train: out of memory\n"); exit(1); }
    }
    h->step[h->n] = (float)step;
    h->loss[h->n] = (float)loss;
    h->gnorm[h->n] = (float)gnorm;
    h->val[h->n] = (float)val;
    h->n++;
}

static void history_free(History *h) { free(h->step); free(h->loss); free(h->gnorm); free(h->val); }

static const char *LOG_HEADER = "step,loss,ce,aux,lr,grad_norm,stream_grad_norm,val_ce,max_vio,tokens_per_s\n";

/* reads DIR/log.csv rows with step < upto (all when upto < 0) into h (loss = CE column) */
static int history_read(History *h, const char *path, int upto) {
    FILE *fp = fopen(path, "r");
    char line[512];
    if (!fp) return -1;
    if (!fgets(line, sizeof line, fp)) { fclose(fp); return -1; }
    while (fgets(line, sizeof line, fp)) {
        int step;
        double loss, ce, aux, lr, gn, sgn, val;
        if (sscanf(line, "%d,%lf,%lf,%lf,%lf,%lf,%lf,%lf", &step, &loss, &ce, &aux, &lr, &gn, &sgn, &val) != 8) continue;
        if (upto >= 0 && step >= upto) break;
        history_add(h, step, ce, gn, val);
    }
    fclose(fp);
    return 0;
}

static void out_path(char *buf, size_t size, const char *dir, const char *name) { snprintf(buf, size, "%s/%s", dir, name); }

/* keeps the header and the rows of steps < upto (a resumed run rewrites what follows) */
static int log_truncate(const char *path, int upto) {
    char tmp[4200], line[512];
    snprintf(tmp, sizeof tmp, "%s.tmp", path);
    FILE *in = fopen(path, "r"), *out = fopen(tmp, "w");
    if (!in || !out) {
        if (in) fclose(in);
        if (out) fclose(out);
        return -1;
    }
    int ok = 1;
    if (fgets(line, sizeof line, in)) ok = fputs(line, out) >= 0;
    while (ok && fgets(line, sizeof line, in)) {
        int step;
        if (sscanf(line, "%d,", &step) == 1 && step < upto) ok = fputs(line, out) >= 0;
    }
    fclose(in);
    if (fclose(out) || !ok) return -1;
    return rename(tmp, path);
}

static void plot_history(const History *h, const char *dir) {
    char path[4096];
    float *vx = (float *)mhc_calloc((size_t)h->n + 1, sizeof(float)), *vy = (float *)mhc_calloc((size_t)h->n + 1, sizeof(float));
    int nv = 0;
    for (int i = 0; i < h->n; i++)
        if (!isnan(h->val[i])) { vx[nv] = h->step[i]; vy[nv++] = h->val[i]; }
    plot_series loss[2] = {{"train CE", h->step, h->loss, h->n, plot_color(0), 1, 0},
                           {"val CE", vx, vy, nv, plot_color(1), 2, 1}};
    out_path(path, sizeof path, dir, "loss.png");
    plot_lines(path, "loss", "step", "cross-entropy (nats)", loss, 2, 0);
    plot_series gn = {"grad norm (pre-clip)", h->step, h->gnorm, h->n, plot_color(2), 1, 0};
    out_path(path, sizeof path, dir, "grad_norm.png");
    plot_lines(path, "global gradient norm", "step", "L2 norm", &gn, 1, 1);
    free(vx);
    free(vy);
}

/* =============================================================================================
   SPEC §14 diagnostics: Amax gain magnitudes and H_res heatmaps over the probe (first T tokens of
   the validation split), paper orientation: forward gain = max |row sum|, backward = max |col sum|. */
/* Amax gain magnitude: max |row sum| (forward gain) or, by_columns, max |column sum| (backward gain) */
static double amax_gain(const double *A, int n, int by_columns) {
    double g = 0;
    for (int a = 0; a < n; a++) {
        double sum = 0;
        for (int b = 0; b < n; b++) sum += by_columns ? A[b * n + a] : A[a * n + b];
        g = fabs(sum) > g ? fabs(sum) : g;
    }
    return g;
}

/* out = A @ B, n x n (out may not alias) */
static void matmul_nn(double *out, const double *A, const double *B, int n) {
    for (int i = 0; i < n; i++)
        for (int j = 0; j < n; j++) {
            double s = 0;
            for (int k = 0; k < n; k++) s += A[i * n + k] * B[k * n + j];
            out[i * n + j] = s;
        }
}

static void diagnostics(Trainer *tr, const int *probe, const char *dir, int step) {
    const MhcConfig *c = &tr->m.cfg;
    if (c->residual == MHC_RESIDUAL_PLAIN) return;
    int T = c->seq_len, n = c->hc_mult, m = mhc_m(c), S = 2 * c->n_layers, L = c->n_layers, nn = n * n;
    mhc_forward_acts(&tr->m, &tr->probe, probe, NULL, 1, T);
    const mhc_real *Hall = tr->probe.coef_H;  /* [S, T, m]; H_res at offset 2n */
    double *gf = (double *)mhc_calloc((size_t)S * 4, sizeof(double));       /* GF, GB, CGF, CGB per sublayer */
    double *Hbar = (double *)mhc_calloc((size_t)S * nn, sizeof(double)), *Pbar = (double *)mhc_calloc((size_t)S * nn, sizeof(double));
    double *half = (double *)mhc_calloc((size_t)3 * nn, sizeof(double));     /* first half, second half, full */
    double *P = (double *)mhc_calloc((size_t)nn, sizeof(double)), *tmp = (double *)mhc_calloc((size_t)nn, sizeof(double));
    double *H = (double *)mhc_calloc((size_t)nn, sizeof(double)), *Q = (double *)mhc_calloc((size_t)nn, sizeof(double));
    for (int t = 0; t < T; t++) {
        for (int k = 0; k < nn; k++) P[k] = k % (n + 1) == 0;   /* P = I, then P_s = P_{s+1} @ H_s, s = S-1..0 */
        for (int k = 0; k < nn; k++) Q[k] = k % (n + 1) == 0;   /* prefix product H_{s} @ ... @ H_0 */
        for (int s = S - 1; s >= 0; s--) {
            for (int k = 0; k < nn; k++) H[k] = Hall[((size_t)s * T + t) * m + 2 * n + k];
            matmul_nn(tmp, P, H, n);
            memcpy(P, tmp, sizeof(double) * nn);
            gf[s * 4 + 0] += amax_gain(H, n, 0) / T;
            gf[s * 4 + 1] += amax_gain(H, n, 1) / T;
            gf[s * 4 + 2] += amax_gain(P, n, 0) / T;
            gf[s * 4 + 3] += amax_gain(P, n, 1) / T;
            for (int k = 0; k < nn; k++) { Hbar[s * nn + k] += H[k] / T; Pbar[s * nn + k] += P[k] / T; }
            if (s == L) for (int k = 0; k < nn; k++) half[nn + k] += P[k] / T;      /* H_{S-1} @ ... @ H_L */
        }
        for (int k = 0; k < nn; k++) half[2 * nn + k] += P[k] / T;                  /* the full product */
        for (int s = 0; s < L; s++) {
            for (int k = 0; k < nn; k++) H[k] = Hall[((size_t)s * T + t) * m + 2 * n + k];
            matmul_nn(tmp, H, Q, n);
            memcpy(Q, tmp, sizeof(double) * nn);
        }
        for (int k = 0; k < nn; k++) half[k] += Q[k] / T;                           /* H_{L-1} @ ... @ H_0 */
    }
    char path[4096];
    out_path(path, sizeof path, dir, "diagnostics.csv");
    FILE *fp = fopen(path, "w");
    if (fp) {
        fprintf(fp, "# step %d, probe = first %d validation tokens\nsublayer,GF,GB,CGF,CGB,gf_Hbar,gb_Hbar,gf_Pbar,gb_Pbar,attenuation\n", step, T);
        for (int s = 0; s < S; s++) {
            double lam = 0;
            for (int j = 0; j < n; j++) {
                double col = 0;
                for (int i = 0; i < n; i++) col += Pbar[s * nn + i * n + j];
                double v = fabs(log(fmax(fabs(col), 1e-30)));
                lam = v > lam ? v : lam;
            }
            fprintf(fp, "%d,%.6g,%.6g,%.6g,%.6g,%.6g,%.6g,%.6g,%.6g,%.6g\n", s, gf[s * 4], gf[s * 4 + 1], gf[s * 4 + 2],
                    gf[s * 4 + 3], amax_gain(Hbar + s * nn, n, 0), amax_gain(Hbar + s * nn, n, 1),
                    amax_gain(Pbar + s * nn, n, 0), amax_gain(Pbar + s * nn, n, 1), lam);
        }
        if (fclose(fp)) fprintf(stderr, "train: cannot write %s\n", path);
    } else {
        fprintf(stderr, "train: cannot write %s: %s\n", path, strerror(errno));
    }
    float *xs = (float *)mhc_calloc((size_t)S, sizeof(float)), *ys = (float *)mhc_calloc((size_t)S * 4, sizeof(float));
    for (int s = 0; s < S; s++) {
        xs[s] = (float)s;
        for (int k = 0; k < 4; k++) ys[k * S + s] = (float)gf[s * 4 + k];
    }
    plot_series g[4] = {{"single layer, forward (max |row sum|)", xs, ys, S, plot_color(0), 2, 1},
                        {"single layer, backward (max |col sum|)", xs, ys + S, S, plot_color(1), 2, 1},
                        {"composite H_{S-1}..H_s, forward", xs, ys + 2 * S, S, plot_color(2), 2, 1},
                        {"composite H_{S-1}..H_s, backward", xs, ys + 3 * S, S, plot_color(3), 2, 1}};
    char title[128];
    snprintf(title, sizeof title, "Amax gain magnitude (%s, step %d, token mean)", c->residual == MHC_RESIDUAL_MHC ? "mHC" : "HC", step);
    out_path(path, sizeof path, dir, "gains.png");
    plot_lines(path, title, "sublayer s", "gain", g, 4, 1);
    float *mats = (float *)mhc_calloc((size_t)6 * nn, sizeof(float));
    int pick[3] = {0, L, S - 1};
    for (int p = 0; p < 3; p++)
        for (int k = 0; k < nn; k++) mats[p * nn + k] = (float)Hbar[pick[p] * nn + k];
    for (int k = 0; k < 3 * nn; k++) mats[3 * nn + k] = (float)half[k];
    char s0[64], s1[64], s2[64];
    snprintf(s0, sizeof s0, "H_res, s = 0");
    snprintf(s1, sizeof s1, "H_res, s = %d", L);
    snprintf(s2, sizeof s2, "H_res, s = %d", S - 1);
    const char *subs[6] = {s0, s1, s2, "H_{L-1} @..@ H_0", "H_{S-1} @..@ H_L", "H_{S-1} @..@ H_0"};
    snprintf(title, sizeof title, "token-averaged H_res and composites (step %d)", step);
    out_path(path, sizeof path, dir, "hres.png");
    plot_heatmaps(path, title, mats, 6, n, subs);
    free(gf); free(Hbar); free(Pbar); free(half); free(P); free(tmp); free(H); free(Q); free(xs); free(ys); free(mats);
}

/* =============================================================================================
   --loss-gap: CE_mode(k) - CE_base(k), raw and EMA (ema = 0.9 ema + 0.1 gap), plus the val gap.  */
static int loss_gap(const char *png, char **dirs, int n) {
    History base;
    memset(&base, 0, sizeof base);
    char path[4096];
    out_path(path, sizeof path, dirs[0], "log.csv");
    if (history_read(&base, path, -1) || base.n == 0) { fprintf(stderr, "train: cannot read %s\n", path); return 1; }
    plot_series series[12];
    memset(series, 0, sizeof series);
    int ns = 0;
    History runs[4];
    float *bufs[4][4];
    char names[4][3][160];
    memset(runs, 0, sizeof runs);
    for (int r = 1; r < n && r <= 4; r++) {
        History *h = &runs[r - 1];
        out_path(path, sizeof path, dirs[r], "log.csv");
        if (history_read(h, path, -1) || h->n == 0) { fprintf(stderr, "train: cannot read %s\n", path); return 1; }
        int len = h->n < base.n ? h->n : base.n, nv = 0;
        float *raw = (float *)mhc_calloc((size_t)len, sizeof(float)), *ema = (float *)mhc_calloc((size_t)len, sizeof(float));
        float *vx = (float *)mhc_calloc((size_t)len, sizeof(float)), *vy = (float *)mhc_calloc((size_t)len, sizeof(float));
        double e = 0;
        for (int i = 0; i < len; i++) {
            raw[i] = h->loss[i] - base.loss[i];
            e = i ? 0.9 * e + 0.1 * raw[i] : raw[i];
            ema[i] = (float)e;
            if (!isnan(h->val[i]) && !isnan(base.val[i])) { vx[nv] = h->step[i]; vy[nv++] = h->val[i] - base.val[i]; }
        }
        bufs[r - 1][0] = raw; bufs[r - 1][1] = ema; bufs[r - 1][2] = vx; bufs[r - 1][3] = vy;
        snprintf(names[r - 1][0], 160, "%s - %s (raw)", dirs[r], dirs[0]);
        snprintf(names[r - 1][1], 160, "%s - %s (EMA 0.9)", dirs[r], dirs[0]);
        snprintf(names[r - 1][2], 160, "%s - %s (val)", dirs[r], dirs[0]);
        series[ns++] = (plot_series){names[r - 1][0], h->step, raw, len, plot_mix(plot_color(r - 1), plot_rgb_make(255, 255, 255), 0.6f), 1, 0};
        series[ns++] = (plot_series){names[r - 1][1], h->step, ema, len, plot_color(r - 1), 2, 0};
        series[ns++] = (plot_series){names[r - 1][2], vx, vy, nv, plot_color(r - 1), -1, 1};
    }
    int rc = plot_lines(png, "loss gap vs the first run (negative = better)", "step", "CE difference (nats)", series, ns, 0);
    for (int r = 1; r < n && r <= 4; r++) {
        for (int k = 0; k < 4; k++) free(bufs[r - 1][k]);
        history_free(&runs[r - 1]);
    }
    history_free(&base);
    if (!rc) printf("wrote %s\n", png);
    return rc ? 1 : 0;
}

/* =============================================================================================
   Checkpoints: OUT/model.safetensors + OUT/optim.safetensors (step, data position in metadata). */
static void save_checkpoint(Trainer *tr, const MhcLoader *loader, const char *dir) {
    char path[4096], err[512], file[32], pos[32];
    trainer_sync(tr);
    snprintf(file, sizeof file, "%d", loader->file);
    snprintf(pos, sizeof pos, "%lld", (long long)loader->pos);
    const char *keys[2] = {"data_file", "data_pos"}, *values[2] = {file, pos};
    out_path(path, sizeof path, dir, "optim.safetensors");
    if (mhc_save_optimizer(&tr->m, path, keys, values, 2, err, sizeof err)) { fprintf(stderr, "train: %s\n", err); exit(1); }
    out_path(path, sizeof path, dir, "model.safetensors");   /* the weights last: their step marks a complete pair */
    if (mhc_save_weights(&tr->m, path, err, sizeof err)) { fprintf(stderr, "train: %s\n", err); exit(1); }
}

/* --resume: the config comes from the checkpoint; flags that set a field must agree with it */
static void resume_config(Options *o) {
    char path[4096], err[512], a[64], b[64];
    MhcConfig ck;
    out_path(path, sizeof path, o->out_dir, "model.safetensors");
    if (mhc_read_config(path, &ck, NULL, err, sizeof err)) { fprintf(stderr, "train: cannot resume: %s\n", err); exit(1); }
    for (int k = 0; k < o->n_set; k++) {
        mhc_config_format(&ck, o->set_names[k], a, sizeof a);
        mhc_config_format(&o->cfg, o->set_names[k], b, sizeof b);
        if (strcmp(a, b)) {
            fprintf(stderr, "train: cannot resume: the checkpoint in %s has %s = %s, the flags ask for %s\n", o->out_dir,
                    o->set_names[k], a, b);
            exit(1);
        }
    }
    o->cfg = ck;
}

static void load_checkpoint(Trainer *tr, MhcLoader *loader, const char *dir) {
    char path[4096], err[512];
    MhcSafetensors st;
    out_path(path, sizeof path, dir, "model.safetensors");
    if (mhc_load_weights(&tr->m, path, err, sizeof err)) { fprintf(stderr, "train: cannot resume: %s\n", err); exit(1); }
    out_path(path, sizeof path, dir, "optim.safetensors");
    if (mhc_load_optimizer(&tr->m, path, &st, err, sizeof err)) { fprintf(stderr, "train: cannot resume: %s\n", err); exit(1); }
    const char *file = mhc_st_meta(&st, "data_file"), *pos = mhc_st_meta(&st, "data_pos");
    if (!file || !pos || mhc_loader_seek(loader, atoi(file), atoll(pos), err, sizeof err)) {
        fprintf(stderr, "train: cannot resume: %s: bad data position (%s)\n", path, file && pos ? err : "missing");
        exit(1);
    }
    mhc_st_close(&st);
}

/* mkdir -p */
static int make_dirs(const char *dir) {
    char path[4096];
    snprintf(path, sizeof path, "%s", dir);
    for (char *p = path + 1; *p; p++) {
        if (*p != '/') continue;
        *p = 0;
        if (mkdir(path, 0755) && errno != EEXIST) return -1;
        *p = '/';
    }
    return mkdir(path, 0755) && errno != EEXIST ? -1 : 0;
}

static double now_seconds(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + 1e-9 * t.tv_nsec;
}

/* every token of every shard must be a valid id */
static void check_vocab(MhcLoader *l, int V) {
    for (int64_t i = 0; i < l->ntok; i++)
        if (l->tokens[i] >= (uint32_t)V) {
            fprintf(stderr, "train: shard %s holds token %u, outside the vocabulary (%d)\n", l->paths[l->file], l->tokens[i], V);
            exit(1);
        }
}

static void open_loader(MhcLoader *l, char **files, int n, const MhcConfig *c) {
    char err[512];
    if (mhc_loader_open(l, files, n, c->batch_size, c->seq_len, err, sizeof err)) {
        fprintf(stderr, "train: %s\n", err);
        if (!strncmp(files[0], "data/sotu_", 10)) fprintf(stderr, "train: prepare the default corpus with `make data`\n");
        exit(1);
    }
    check_vocab(l, c->vocab_size);
}

int main(int argc, char **argv) {
    Options o;
    if (argc > 1 && !strcmp(argv[1], "--loss-gap")) {
        if (argc < 5) { fprintf(stderr, "train: --loss-gap PNG BASE_DIR DIR [DIR...]\n"); return 2; }
        return loss_gap(argv[2], argv + 3, argc - 3);
    }
    parse_args(&o, argc, argv);
    if (o.resume) resume_config(&o);
    char err[512];
    if (mhc_config_validate(&o.cfg, err, sizeof err)) { fprintf(stderr, "train: %s\n", err); return 2; }
    if (o.dry_run) { dry_run(&o.cfg, o.grad_accum, o.precision, o.recompute); return 0; }
#ifdef _OPENMP
    if (o.threads) omp_set_num_threads(o.threads);
#endif
    const MhcConfig *c = &o.cfg;
    int B = c->batch_size, T = c->seq_len, N = B * T;
    MhcLoader train, val;
    open_loader(&train, o.train_files, o.n_train, c);
    open_loader(&val, o.val_files, o.n_val, c);
    if (make_dirs(o.out_dir)) { fprintf(stderr, "train: cannot create %s: %s\n", o.out_dir, strerror(errno)); return 1; }

    Trainer tr;
    memset(&tr, 0, sizeof tr);
    if (mhc_model_init(&tr.m, c)) return 2;
    History hist;
    memset(&hist, 0, sizeof hist);
    char path[4096];
    out_path(path, sizeof path, o.out_dir, "log.csv");
    if (o.resume) {
        load_checkpoint(&tr, &train, o.out_dir);
        history_read(&hist, path, tr.m.step);
        printf("resumed %s at step %d\n", o.out_dir, tr.m.step);
    } else {
        mhc_init_params(&tr.m, o.seed);
    }
    if (o.resume && log_truncate(path, tr.m.step)) { fprintf(stderr, "train: cannot rewrite %s\n", path); return 1; }
    FILE *log = fopen(path, o.resume ? "a" : "w");
    if (!log) { fprintf(stderr, "train: cannot write %s: %s\n", path, strerror(errno)); return 1; }
    if (!o.resume) fputs(LOG_HEADER, log);

    int64_t total, active;
    mhc_count_params(c, &total, &active);
    printf("mhc train: L %d, C %d, residual %s (n = %d), %lld params (%lld active), batch %d x %d, %d steps, %s\n",
           c->n_layers, c->d_model, c->residual == MHC_RESIDUAL_PLAIN ? "plain" : c->residual == MHC_RESIDUAL_HC ? "hc" : "mhc",
           c->hc_mult, (long long)total, (long long)active, B, T, c->steps,
#ifdef __CUDACC__
           "GPU"
#else
           "CPU"
#endif
    );
    if (o.grad_accum > 1) printf("each step: %d micro-batches of %d x %d (gradients accumulated)\n", o.grad_accum, B / o.grad_accum, T);
    int *x = (int *)mhc_calloc((size_t)N, sizeof(int)), *y = (int *)mhc_calloc((size_t)N, sizeof(int));
    int *probe = (int *)mhc_calloc((size_t)T, sizeof(int));
    for (int t = 0; t < T; t++) probe[t] = (int)val.tokens[t];    /* SPEC §14: the first T validation tokens */
    tr.precision = o.precision;
    tr.recompute = o.recompute;
    tr.wgmma = o.wgmma;
    trainer_start(&tr, o.grad_accum);
#ifdef __CUDACC__
    printf("GPU GEMM precision: %s%s%s%s\n", precision_names[o.precision], o.recompute ? ", recompute" : "",
           o.wgmma & WGMMA_EXPERTS ? ", routed-expert GEMMs on wgmma" : "",
           o.wgmma & WGMMA_ATTENTION ? ", attention on wgmma" : "");
#endif
    double t_start = now_seconds();
    int first_step = tr.m.step;
    for (int step = tr.m.step; step < c->steps; step++) {
        double t0 = now_seconds(), stream_norm;
        if (mhc_loader_next(&train, B, T, x, y, err, sizeof err)) { fprintf(stderr, "train: %s\n", err); return 1; }
        double loss = trainer_step(&tr, x, y, &stream_norm);
        if (!isfinite(loss)) {
            fprintf(stderr, "train: step %d: the loss is %f; stopping without writing a checkpoint (the last one is intact)\n", step, loss);
            return 1;
        }
        double lr = mhc_lr_at(c, step), ce = tr.m.ce, aux = tr.m.aux;
#ifdef __CUDACC__
        ce = tr.gpu.ce;
        aux = tr.gpu.aux;
#endif
        double norm = trainer_update(&tr, lr);
        double dt = now_seconds() - t0, tps = N / dt, elapsed = now_seconds() - t_start;
        double eta = elapsed / (step + 1 - first_step) * (c->steps - step - 1);
        int last = step + 1 == c->steps || step + 1 == o.stop_after;
        double val_ce = NAN, maxvio = 0;
        if (!o.bench && ((step + 1) % o.eval_every == 0 || last)) {
            double sum = 0;
            val.pos = 0;
            if (val.file != 0) mhc_loader_seek(&val, 0, 0, err, sizeof err);
            for (int k = 0; k < o.eval_batches; k++) {
                if (mhc_loader_next(&val, B, T, x, y, err, sizeof err)) { fprintf(stderr, "train: %s\n", err); return 1; }
                sum += trainer_eval(&tr, x, y);
            }
            val_ce = sum / o.eval_batches;
        }
        if (!isnan(val_ce)) trainer_sync(&tr);     /* GPU: expert loads and weights for the diagnostics */
        for (int l = c->first_k_dense; l < c->n_layers; l++) {
            double v = mhc_max_violation(&tr.m, l);
            maxvio = v > maxvio ? v : maxvio;
        }
        printf("step %5d/%d | loss %.4f (ce %.4f aux %.4f) | lr %.2e | grad norm %.3f | %.0f tok/s | ETA %.0fs%s",
               step + 1, c->steps, loss, ce, aux, lr, norm, tps, eta, isnan(val_ce) ? "\n" : "");
        if (!isnan(val_ce)) printf(" | val ce %.4f\n", val_ce);
#ifdef __CUDACC__
        if (step == first_step) {   /* every device buffer exists after the first step (cuBLAS workspace included) */
            size_t free_b = 0, total_b = 0;
            CUDA_CHECK(cudaMemGetInfo(&free_b, &total_b));
            printf("gpu memory after the first step: %.3f GiB in use on the device (of %.3f GiB), %.3f GiB allocated by mhc_gpu\n",
                   (double)(total_b - free_b) / (1 << 30), (double)total_b / (1 << 30),
                   (double)mhc_gpu_memory_bytes(&tr.gpu) / (1 << 30));
        }
#endif
        fflush(stdout);
        fprintf(log, "%d,%.17g,%.17g,%.6g,%.6e,%.6f,%.6f,%.6f,%.4f,%.1f\n", step, loss, ce, aux, lr, norm, stream_norm, val_ce,
                maxvio, tps);
        fflush(log);
        history_add(&hist, step, ce, norm, val_ce);
        if (!isnan(val_ce)) {
            plot_history(&hist, o.out_dir);
            diagnostics(&tr, probe, o.out_dir, step + 1);
        }
        if (!o.bench && ((step + 1) % o.ckpt_every == 0 || last)) save_checkpoint(&tr, &train, o.out_dir);
        if (step + 1 == o.stop_after) break;
    }
    if (fclose(log)) fprintf(stderr, "train: error closing log.csv\n");
    if (o.bench) printf("done: %s/log.csv (--bench: no checkpoint, plots or diagnostics)\n", o.out_dir);
    else printf("done: %s/model.safetensors, log.csv, loss.png, grad_norm.png%s\n", o.out_dir,
                c->residual == MHC_RESIDUAL_PLAIN ? "" : ", gains.png, hres.png, diagnostics.csv");
    free(x); free(y); free(probe);
    history_free(&hist);
    mhc_acts_destroy(&tr.probe);
#ifdef __CUDACC__
    mhc_gpu_free(&tr.gpu);
#endif
    mhc_loader_close(&train);
    mhc_loader_close(&val);
    mhc_model_free(&tr.m);
    return 0;
}
