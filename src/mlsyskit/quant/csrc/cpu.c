/* What this CPU can run, as the OS really enables it.
 *
 * /proc/cpuinfo (CPUID) lists what the silicon has; the OS must also save the wider registers
 * on a context switch (XCR0, read with XGETBV once CPUID says OSXSAVE), or the first AVX-512 /
 * AMX instruction dies with SIGILL. AMX additionally needs a per-process permission from Linux
 * (arch_prctl ARCH_REQ_XCOMP_PERM), which oneDNN requests itself; we only report the state bits.
 */
#include <stdint.h>

enum {
    CPU_AVX2 = 1 << 0,
    CPU_FMA = 1 << 1,
    CPU_F16C = 1 << 2,
    CPU_AVX512 = 1 << 3,      /* F + BW + VL (+ DQ): what our AVX-512 code uses */
    CPU_AVX512_VNNI = 1 << 4,
    CPU_AVX_VNNI = 1 << 5,    /* VEX-encoded vpdpbusd (Alder Lake+, without AVX-512) */
    CPU_AVX512_BF16 = 1 << 6,
    CPU_AMX_BF16 = 1 << 7,
    CPU_AMX_INT8 = 1 << 8,
};

#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>

static uint64_t xgetbv0(void) {
    uint32_t lo, hi;
    __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    return ((uint64_t)hi << 32) | lo;
}

int mlsk_cpu_features(void) {
    unsigned a, b, c, d;
    if (!__get_cpuid(1, &a, &b, &c, &d)) return 0;
    const int osxsave = (c >> 27) & 1, avx = (c >> 28) & 1, fma = (c >> 12) & 1, f16c = (c >> 29) & 1;
    if (!osxsave || !avx) return 0;
    const uint64_t xcr0 = xgetbv0();
    const int os_ymm = (xcr0 & 0x6) == 0x6;        /* SSE + AVX state */
    const int os_zmm = (xcr0 & 0xE6) == 0xE6;      /* + opmask, ZMM_Hi256, Hi16_ZMM */
    const int os_amx = (xcr0 & 0x60000) == 0x60000; /* XTILECFG + XTILEDATA */
    if (!os_ymm) return 0;
    int f = 0;
    if (fma) f |= CPU_FMA;
    if (f16c) f |= CPU_F16C;
    if (__get_cpuid_max(0, 0) < 7) return f;
    __cpuid_count(7, 0, a, b, c, d);
    if ((b >> 5) & 1) f |= CPU_AVX2;
    const int avx512 = ((b >> 16) & 1) && ((b >> 30) & 1) && ((b >> 31) & 1) && ((b >> 17) & 1);
    if (avx512 && os_zmm) {
        f |= CPU_AVX512;
        if ((c >> 11) & 1) f |= CPU_AVX512_VNNI;
    }
    if (os_amx) {
        if ((d >> 22) & 1) f |= CPU_AMX_BF16;
        if ((d >> 25) & 1) f |= CPU_AMX_INT8;
    }
    __cpuid_count(7, 1, a, b, c, d);
    if ((a >> 4) & 1) f |= CPU_AVX_VNNI;
    if (((a >> 5) & 1) && (f & CPU_AVX512)) f |= CPU_AVX512_BF16;
    return f;
}
#else
int mlsk_cpu_features(void) { return 0; }
#endif

/* Which instruction set this build of the kernels was compiled for. */
const char *mlsk_variant(void) {
#if defined(__AVX512VNNI__) && defined(__AVX512BW__) && defined(__AVX512VL__)
    return "avx512vnni";
#elif defined(__AVXVNNI__) && defined(__AVX2__)
    return "avxvnni";
#elif defined(__AVX2__) && defined(__FMA__)
    return "avx2";
#else
    return "generic";
#endif
}
