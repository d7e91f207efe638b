// wkvc CUDA host emulator: runs the CUDA C of `wkvc_codegen::cuda` on a CPU, to check the
// kernels (indexing, shared memory, barriers, warp shuffles, the tensor-core fragments) and
// the CUDA engine that launches them without a GPU. Each CUDA thread of a block is a fiber
// on the calling OS thread (a 7-instruction stack switch on x86-64, ucontext elsewhere); blocks run one after another, so `__shared__` arrays
// are per-OS-thread statics. `__syncthreads` waits for every live thread of the block, a
// shuffle for every live lane of the warp (as sm_70 and later). A kernel whose threads all
// wait on barriers that can never complete (divergent barriers) is reported as a deadlock,
// not a hang. f16 conversions round to nearest even as the PTX `cvt.rn` does; `mma_16816`
// follows PTX's m16n8k16 fragment layout, summing the 16 products in f32 in k order.
#include <ucontext.h>
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <utility>

struct dim3 {
    unsigned x, y, z;
};
struct alignas(16) uint4 {
    unsigned x, y, z, w;
};
struct alignas(16) float4 {
    float x, y, z, w;
};
static inline float4 make_float4(float x, float y, float z, float w) { return float4{x, y, z, w}; }

#define __global__
#define __device__ static inline
#define __forceinline__
#define __shared__ static thread_local
#define __launch_bounds__(...)
#define __ldg(p) (*(p))

static inline float __int_as_float(int i) {
    float f;
    memcpy(&f, &i, 4);
    return f;
}
static inline int min(int a, int b) { return a < b ? a : b; }
static inline int max(int a, int b) { return a > b ? a : b; }

struct WkFiber {
#if defined(__x86_64__)
    void* sp;
#else
    ucontext_t ctx;
#endif
    dim3 tid;
    unsigned lane, warp;
    bool done;
    int bar;            // barrier waited on (-1: none)
    unsigned long gen;  // its generation when the wait began
};
struct WkBar {
    int expected, arrived;
    unsigned long gen;
};
enum { WK_MAX_THREADS = 1024, WK_STACK = 64 * 1024 };

static thread_local WkFiber* wk_cur;
static thread_local dim3 wk_bid, wk_bdim, wk_gdim;
#if defined(__x86_64__)
// save the callee-saved registers and the stack pointer in *save, continue on `load` (a stack
// that wk_swap saved, or a fresh one from wk_fresh_stack)
extern "C" void wk_swap(void** save, void* load);
asm(".pushsection .text\n.p2align 4\nwk_swap:\n"
    "pushq %rbp\npushq %rbx\npushq %r12\npushq %r13\npushq %r14\npushq %r15\n"
    "movq %rsp, (%rdi)\nmovq %rsi, %rsp\n"
    "popq %r15\npopq %r14\npopq %r13\npopq %r12\npopq %rbx\npopq %rbp\nret\n"
    ".popsection\n");
static thread_local void* wk_sched_sp;
#define WK_YIELD(f) wk_swap(&(f)->sp, wk_sched_sp)
#define WK_RESUME(f) wk_swap(&wk_sched_sp, (f)->sp)
#else
static thread_local ucontext_t wk_sched;
#define WK_YIELD(f) swapcontext(&(f)->ctx, &wk_sched)
#define WK_RESUME(f) swapcontext(&wk_sched, &(f)->ctx)
#endif
static thread_local WkBar wk_bars[1 + WK_MAX_THREADS / 32];
// per warp and lane: the values a shuffle or an mma exchanges
struct WkSlot {
    uint32_t v;
    uint32_t a[4], b[2];
    float c[4];
};
static thread_local WkSlot wk_slots[WK_MAX_THREADS / 32][32];
static thread_local void (*wk_body)(void*);
static thread_local void* wk_body_arg;

#define threadIdx (wk_cur->tid)
#define blockIdx wk_bid
#define blockDim wk_bdim
#define gridDim wk_gdim

static inline void wk_release_if_full(WkBar& b) {
    if (b.arrived > 0 && b.arrived >= b.expected) {
        b.arrived = 0;
        b.gen++;
    }
}

// wait on barrier `b` (0: the block, 1 + w: warp w)
static inline void wk_wait(int b) {
    WkBar& B = wk_bars[b];
    WkFiber* f = wk_cur;
    f->bar = b;
    f->gen = B.gen;
    B.arrived++;
    wk_release_if_full(B);
    WK_YIELD(f);
    f->bar = -1;
}

static inline void __syncthreads() { wk_wait(0); }

template <class T>
static inline T __shfl_xor_sync(unsigned, T v, int o) {
    static_assert(sizeof(T) == 4, "4-byte shuffles only");
    WkFiber* f = wk_cur;
    memcpy(&wk_slots[f->warp][f->lane].v, &v, 4);
    wk_wait(1 + f->warp);
    T r;
    memcpy(&r, &wk_slots[f->warp][(f->lane ^ (unsigned)o) & 31].v, 4);
    wk_wait(1 + f->warp);
    return r;
}

typedef unsigned short u16;

// f32 -> f16, round to nearest even (F. Giesen's float_to_half_fast3_rtne)
static inline u16 f2h(float v) {
    uint32_t u;
    memcpy(&u, &v, 4);
    uint32_t sign = u & 0x80000000u;
    u ^= sign;
    uint32_t o;
    if (u >= (uint32_t)(127 + 16) << 23) {
        o = u > (255u << 23) ? 0x7e00u : 0x7c00u;
    } else if (u < (113u << 23)) {
        float f, magic;
        uint32_t mu = (uint32_t)((127 - 15) + (23 - 10) + 1) << 23;
        memcpy(&f, &u, 4);
        memcpy(&magic, &mu, 4);
        f += magic;
        memcpy(&u, &f, 4);
        o = u - mu;
    } else {
        uint32_t odd = (u >> 13) & 1;
        u += ((uint32_t)(15 - 127) << 23) + 0xfff;
        u += odd;
        o = u >> 13;
    }
    return (u16)(o | (sign >> 16));
}

// f16 -> f32, exact
static inline float h2f(u16 h) {
    uint32_t o = (uint32_t)(h & 0x7fffu) << 13;
    uint32_t exp = o & (0x7c00u << 13);
    o += (uint32_t)(127 - 15) << 23;
    float f;
    if (exp == (0x7c00u << 13)) {
        o += (uint32_t)(128 - 16) << 23;
        memcpy(&f, &o, 4);
    } else if (exp == 0) {
        o += 1u << 23;
        memcpy(&f, &o, 4);
        uint32_t mu = 113u << 23;
        float magic;
        memcpy(&magic, &mu, 4);
        f -= magic;
    } else {
        memcpy(&f, &o, 4);
    }
    uint32_t bits;
    memcpy(&bits, &f, 4);
    bits |= (uint32_t)(h & 0x8000u) << 16;
    memcpy(&f, &bits, 4);
    return f;
}

static inline unsigned pack_h2(float lo, float hi) {
    return (unsigned)f2h(lo) | ((unsigned)f2h(hi) << 16);
}

// one f16 of a fragment register (`hi`: the upper half)
static inline float wk_half(uint32_t r, int hi) { return h2f((u16)(hi ? r >> 16 : r & 0xffffu)); }

static inline void mma_16816(float& d0, float& d1, float& d2, float& d3, unsigned a0,
                             unsigned a1, unsigned a2, unsigned a3, unsigned b0, unsigned b1) {
    WkFiber* f = wk_cur;
    WkSlot& me = wk_slots[f->warp][f->lane];
    me.a[0] = a0, me.a[1] = a1, me.a[2] = a2, me.a[3] = a3;
    me.b[0] = b0, me.b[1] = b1;
    wk_wait(1 + f->warp);
    // A[r][k]: lane (r % 8) * 4 + (k % 8) / 2, register (r >= 8) + 2 (k >= 8), half k % 2;
    // B[k][n]: lane n * 4 + (k % 8) / 2, register k >= 8, half k % 2;
    // D: d0, d1 = row g, columns 2t, 2t + 1; d2, d3 = row g + 8 (g = lane / 4, t = lane % 4)
    int g = (int)f->lane >> 2, t = (int)f->lane & 3;
    float* d[4] = {&d0, &d1, &d2, &d3};
    for (int e = 0; e < 4; e++) {
        int r = g + 8 * (e >> 1), n = 2 * t + (e & 1);
        float acc = *d[e];
        for (int k = 0; k < 16; k++) {
            const WkSlot& as = wk_slots[f->warp][(r % 8) * 4 + (k % 8) / 2];
            const WkSlot& bs = wk_slots[f->warp][n * 4 + (k % 8) / 2];
            float a = wk_half(as.a[(r >= 8) + 2 * (k >= 8)], k % 2);
            float b = wk_half(bs.b[k >= 8], k % 2);
            acc = fmaf(a, b, acc);
        }
        *d[e] = acc;
    }
    wk_wait(1 + f->warp);
}

static void wk_trampoline() {
    wk_body(wk_body_arg);
    WkFiber* f = wk_cur;
    f->done = true;
    WkBar& b = wk_bars[0];
    WkBar& w = wk_bars[1 + f->warp];
    b.expected--;
    w.expected--;
    wk_release_if_full(b);
    wk_release_if_full(w);
#if defined(__x86_64__)
    // back to the scheduler for good
    WK_YIELD(f);
    __builtin_unreachable();
#endif
    // (ucontext) returns to uc_link: the scheduler
}

#if defined(__x86_64__)
// a fiber's first wk_swap "returns" into wk_trampoline as if called (rsp = 8 mod 16)
static void* wk_fresh_stack(char* base, size_t size) {
    void** sp = (void**)(((uintptr_t)(base + size)) & ~(uintptr_t)15);
    *--sp = 0;                     // wk_trampoline's return address: never used
    *--sp = (void*)wk_trampoline;  // wk_swap's ret
    for (int i = 0; i < 6; i++) *--sp = 0;  // rbp rbx r12 r13 r14 r15
    return sp;
}
#endif

static thread_local char* wk_stacks;
static thread_local WkFiber* wk_fibers;

// every block of the grid; 0, or 1 when the block's threads deadlock on barriers, 2 for a
// block too large
static int wk_run_grid(const unsigned* g, const unsigned* b) {
    unsigned n = b[0] * b[1] * b[2];
    if (n == 0 || n > WK_MAX_THREADS) return 2;
    if (!wk_stacks) {
        wk_stacks = (char*)malloc((size_t)WK_MAX_THREADS * WK_STACK);
        wk_fibers = (WkFiber*)calloc(WK_MAX_THREADS, sizeof(WkFiber));
        if (!wk_stacks || !wk_fibers) return 3;
    }
    wk_gdim = dim3{g[0], g[1], g[2]};
    wk_bdim = dim3{b[0], b[1], b[2]};
    unsigned nw = (n + 31) / 32;
    for (unsigned bz = 0; bz < g[2]; bz++)
        for (unsigned by = 0; by < g[1]; by++)
            for (unsigned bx = 0; bx < g[0]; bx++) {
                wk_bid = dim3{bx, by, bz};
                wk_bars[0] = WkBar{(int)n, 0, 0};
                for (unsigned w = 0; w < nw; w++)
                    wk_bars[1 + w] = WkBar{(int)(n - 32 * w < 32 ? n - 32 * w : 32), 0, 0};
                for (unsigned t = 0; t < n; t++) {
                    WkFiber& f = wk_fibers[t];
                    f.tid = dim3{t % b[0], (t / b[0]) % b[1], t / (b[0] * b[1])};
                    f.lane = t & 31;
                    f.warp = t >> 5;
                    f.done = false;
                    f.bar = -1;
#if defined(__x86_64__)
                    f.sp = wk_fresh_stack(wk_stacks + (size_t)t * WK_STACK, WK_STACK);
#else
                    getcontext(&f.ctx);
                    f.ctx.uc_stack.ss_sp = wk_stacks + (size_t)t * WK_STACK;
                    f.ctx.uc_stack.ss_size = WK_STACK;
                    f.ctx.uc_link = &wk_sched;
                    makecontext(&f.ctx, wk_trampoline, 0);
#endif
                }
                for (;;) {
                    bool all_done = true, ran = false;
                    for (unsigned t = 0; t < n; t++) {
                        WkFiber& f = wk_fibers[t];
                        if (f.done) continue;
                        all_done = false;
                        if (f.bar >= 0 && wk_bars[f.bar].gen == f.gen) continue;
                        wk_cur = &f;
                        WK_RESUME(&f);
                        ran = true;
                    }
                    if (all_done) break;
                    if (!ran) return 1;
                }
            }
    return 0;
}

template <class... A, size_t... I>
static void wk_call(void (*f)(A...), void** a, std::index_sequence<I...>) {
    f(*(A*)a[I]...);
}

// launch kernel `f` on grid g[3] x block b[3] with its arguments as cuLaunchKernel's
// kernelParams (a pointer to each argument's value)
template <class... A>
static int wk_launch(void (*f)(A...), const unsigned* g, const unsigned* b, void** args) {
    struct Ctx {
        void (*f)(A...);
        void** args;
    } c{f, args};
    wk_body = [](void* p) {
        Ctx* c = (Ctx*)p;
        wk_call(c->f, c->args, std::index_sequence_for<A...>{});
    };
    wk_body_arg = &c;
    return wk_run_grid(g, b);
}
