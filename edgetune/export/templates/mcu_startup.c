/*
 * Bare-metal startup for an exported Cortex-M project: the vector table, the reset handler
 * (copy .data, clear .bss, enable the FPU, paint the stack, call main), a SysTick counter and
 * ARM semihosting for output and exit (QEMU's -semihosting; a debugger on a real board).
 * No libc startup, no heap: nothing calls malloc.
 */
#include <stdint.h>

#include "et_mcu.h"

extern uint32_t _sidata, _sdata, _edata, _sbss, _ebss, _sstack, _estack;
int main(void);

#define STACK_PAINT 0xA5A5A5A5u

static volatile uint32_t systick_wraps;

/* ---------------------------------------------------------------- semihosting */
static int32_t semihost(int32_t op, const void *arg) {
    register int32_t r0 __asm__("r0") = op;
    register const void *r1 __asm__("r1") = arg;
    __asm__ volatile("bkpt 0xab" : "+r"(r0) : "r"(r1) : "memory");
    return r0;
}

void et_mcu_write(const char *text) { semihost(0x04, text); /* SYS_WRITE0 */ }

void et_mcu_exit(int code) {
    /* SYS_EXIT: ADP_Stopped_ApplicationExit is success, anything else a failure */
    semihost(0x18, (const void *)(uintptr_t)(code == 0 ? 0x20026u : 0x20024u));
    for (;;) {
    }
}

/* ---------------------------------------------------------------- SysTick: a 64-bit tick count */
#define SYST_CSR (*(volatile uint32_t *)0xE000E010u)
#define SYST_RVR (*(volatile uint32_t *)0xE000E014u)
#define SYST_CVR (*(volatile uint32_t *)0xE000E018u)

void SysTick_Handler(void) { systick_wraps++; }

uint64_t et_mcu_ticks(void) {
    uint32_t w, v;
    do {
        w = systick_wraps;
        v = SYST_CVR;
    } while (w != systick_wraps);
    return (uint64_t)w * 0x1000000u + (0xFFFFFFu - v);
}

/* ---------------------------------------------------------------- memory facts */
uint32_t et_mcu_stack_used(void) {
    const uint32_t *p = &_sstack;
    while (p < &_estack && *p == STACK_PAINT) p++;
    return (uint32_t)((uintptr_t)&_estack - (uintptr_t)p);
}

uint32_t et_mcu_stack_size(void) { return (uint32_t)((uintptr_t)&_estack - (uintptr_t)&_sstack); }
uint32_t et_mcu_static_ram(void) { return (uint32_t)((uintptr_t)&_ebss - (uintptr_t)&_sdata); }

/* ---------------------------------------------------------------- reset */
void Reset_Handler(void) {
    uint32_t *src = &_sidata, *dst = &_sdata;
    while (dst < &_edata) *dst++ = *src++;
    for (dst = &_sbss; dst < &_ebss; dst++) *dst = 0;
    /* full access to the FPU (CP10, CP11) before any float instruction runs */
    *(volatile uint32_t *)0xE000ED88u |= 0xFu << 20;
    __asm__ volatile("dsb\n\tisb" ::: "memory");
    /* paint the stack below the current frame, to measure how deep it went */
    uint32_t *sp;
    __asm__ volatile("mov %0, sp" : "=r"(sp));
    for (uint32_t *p = &_sstack; p < sp - 16; p++) *p = STACK_PAINT;
    SYST_RVR = 0xFFFFFFu;
    SYST_CVR = 0;
    SYST_CSR = 0x7u; /* processor clock, interrupt on wrap, enabled */
    while (SYST_CVR == 0) { /* until the first reload: a count from 0 would read as a full period */
    }
    et_mcu_exit(main());
}

static void Fault_Handler(void) {
    et_mcu_write("train: fault (hard fault, bus or usage fault)\n");
    et_mcu_exit(1);
}

__attribute__((section(".isr_vector"), used)) static void (*const vectors[16])(void) = {
    (void (*)(void))(uintptr_t)&_estack, /* initial stack pointer */
    Reset_Handler, Fault_Handler,        /* reset, NMI */
    Fault_Handler, Fault_Handler, Fault_Handler, Fault_Handler, /* hard, memory, bus, usage fault */
    0, 0, 0, 0,                          /* reserved */
    Fault_Handler, Fault_Handler, 0,     /* SVC, debug monitor, reserved */
    Fault_Handler, SysTick_Handler,      /* PendSV, SysTick */
};
