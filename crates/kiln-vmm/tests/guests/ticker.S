# A guest that never stops on its own: prints "tick:" then a '.' every few million loop iterations,
# forever (every ~15 ms on PVM, far faster on hardware). Used to observe pause/resume (output stops and restarts) through the API.
    pvh_note
    .text
    .code32
    .globl _start
_start:
    mov $0x3f8, %dx
    putc 't'
    putc 'i'
    putc 'c'
    putc 'k'
    putc ':'
1:  mov $0x2000, %ecx                # short: on PVM this mode is emulated, ~2 us an instruction
2:  dec %ecx
    jnz 2b
    putc '.'
    jmp 1b
