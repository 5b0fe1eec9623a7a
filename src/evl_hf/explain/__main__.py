from evl_hf.explain import main


main()
