# Shared macros for Kiln's purpose-built test guests. COM1 is 0x3f8; %dx must hold it for putc.
.macro putc c
    mov $\c, %al
    out %al, (%dx)
.endm
# Pulse the reset line through the i8042 (kiln-vmm then exits 0), then halt in case it didn't.
.macro i8042_reset
    mov $0xfe, %al
    out %al, $0x64
1:  hlt
    jmp 1b
.endm
# The ELF note that makes a loader enter _start through PVH (XEN_ELFNOTE_PHYS32_ENTRY).
.macro pvh_note
    .pushsection .note.Xen, "a", @note
    .balign 4
    .long 4, 4, 18          # namesz, descsz, type
    .asciz "Xen"
    .balign 4
    .long _start
    .popsection
.endm
