# Entered through PVH: 32-bit protected mode, paging off, %ebx = hvm_start_info.
# Prints "pvh:" then one letter per check that held, then resets through the i8042.
    pvh_note
    .text
    .code32
    .globl _start
_start:
    mov $0x3f8, %dx
    putc 'p'
    putc 'v'
    putc 'h'
    putc ':'
    cmpl $0x336ec578, (%ebx)        # hvm_start_info.magic
    jne 9f
    putc 'M'
    movb $123, 0xc0000000           # boot timer: "guest booted"
    putc 'T'
    mov 0xd0000000, %eax            # virtio-mmio MagicValue of the first device
    cmp $0x74726976, %eax
    jne 9f
    putc 'V'
    mov 0xc8000000, %eax            # nothing mapped here: reads as all ones
    cmp $0xffffffff, %eax
    jne 9f
    putc 'F'
    mov $0x2f8, %dx                 # COM2 is not present: reads as 0xff (no stack: no push/pop)
    in (%dx), %al
    mov $0x3f8, %dx
    cmp $0xff, %al
    jne 9f
    putc 'U'
    putc '\n'
    i8042_reset
9:  putc 'X'
    putc '\n'
    i8042_reset
