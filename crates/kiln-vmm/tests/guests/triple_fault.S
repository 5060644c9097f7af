# A guest that dies the way a broken kernel does: an invalid opcode with the boot IDT (no handlers),
# so #UD escalates to a double and then a triple fault. KVM reports KVM_EXIT_SHUTDOWN.
    pvh_note
    .text
    .code32
    .globl _start
_start:
    mov $0x3f8, %dx
    putc 'T'
    putc '\n'
    mov $0x7a11, %eax           # a marker the VMM's register dump must show
    ud2
