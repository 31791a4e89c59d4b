/* The board services of an exported microcontroller project (startup.c). */
#ifndef ET_MCU_H
#define ET_MCU_H

#include <stdint.h>

/* SysTick runs at the core clock; QEMU's mps2 boards clock it at 25 MHz. */
#define ET_MCU_TICK_HZ 25000000.0

void et_mcu_write(const char *text);   /* to the host (semihosting) */
void et_mcu_exit(int code);            /* end the run: 0 success */
uint64_t et_mcu_ticks(void);           /* SysTick ticks since reset */
uint32_t et_mcu_stack_used(void);      /* deepest stack so far, bytes */
uint32_t et_mcu_stack_size(void);
uint32_t et_mcu_static_ram(void);      /* .data + .bss, bytes */

#endif
