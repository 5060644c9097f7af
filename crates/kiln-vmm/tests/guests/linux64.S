# No PVH note: entered through Linux's 64-bit boot protocol (long mode, identity-mapped first GiB,
# %rsi = zero page). Prints "lm:" then one letter per check that held, then resets.
    .text
    .code64
    .globl _start
_start:
    mov $0x3f8, %dx
    putc 'l'
    putc 'm'
    putc ':'
    cmpl $0x53726448, 0x202(%rsi)   # boot_params.hdr.header == "HdrS"
    jne 9f
    putc 'Z'
    mov 0x228(%rsi), %ebx           # boot_params.hdr.cmd_line_ptr
    cmpl $0x6e6c696b, (%rbx)        # the command line starts with "kiln"
    jne 9f
    putc 'C'
    # Only the first GiB is mapped at entry (Linux builds its own page tables), so no MMIO here.
    putc '\n'
    i8042_reset
9:  putc 'X'
    putc '\n'
    i8042_reset
